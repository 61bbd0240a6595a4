"""agegender: face age-group and gender classifiers, from training to a torch-free CPU runtime."""

__version__ = "0.1.0"
