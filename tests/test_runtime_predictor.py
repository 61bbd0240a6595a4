"""The Python API: Predictor/Face, the shared session, the crop contract, model validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from contract_model import build_contract_model, reference_probs

from agegender.runtime import AGE_GROUPS, GENDERS, Predictor
from agegender.runtime import predictor as predictor_mod
from agegender.runtime.detect import Detection
from agegender.runtime.model import ModelError
from agegender.runtime.preprocess import prepare_face, prepare_precropped, to_input


pytestmark = pytest.mark.usefixtures("offline")  # conftest: no user settings, no network


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_contract_model(tmp_path_factory.mktemp("m") / "contract.onnx", input_size=32, crop_margin=0.25)


class FixedDetector:
    """Returns the same boxes for every image."""

    name = "fixed"

    def __init__(self, boxes):
        self.dets = [Detection(tuple(map(float, b)), 0.5 + 0.1 * i) for i, b in enumerate(boxes)]

    def detect(self, image):
        return list(self.dets)


def _image(h=90, w=120, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[:, : w // 2] //= 3  # left half darker, so crops of different boxes differ
    return img


def test_whole_image_face_matches_the_training_preprocessing(model):
    img = _image()
    faces = Predictor(model, detector="none").predict(img)
    assert len(faces) == 1
    f = faces[0]
    assert f.box == (0, 0, 120, 90) and f.det_score == 1.0
    # a pre-cropped face is framed as training evaluated it: the whole image, squared, no margin
    ref = reference_probs(to_input([prepare_precropped(img, 32)]))
    assert list(f.age_probs) == list(AGE_GROUPS)
    np.testing.assert_allclose(list(f.age_probs.values()), ref["age_probs"][0], atol=1e-5)
    assert f.age == AGE_GROUPS[int(ref["age_probs"][0].argmax())]
    assert f.gender == GENDERS[int(ref["gender_probs"][0].argmax())]
    assert f.gender_score == pytest.approx(ref["gender_probs"][0].max(), abs=1e-5)


def test_detected_faces_are_cropped_with_the_model_margin_in_one_batch(model, monkeypatch):
    img = _image()
    boxes = [(5, 10, 35, 40), (70, 20, 110, 70), (100, 60, 130, 95)]  # the last leaves the image
    pred = Predictor(model, detector=FixedDetector(boxes))
    calls = []
    real_run = pred.classifier.run
    monkeypatch.setattr(pred.classifier, "run",
                        lambda batch, flip=False: calls.append(batch.shape) or real_run(batch, flip=flip))
    faces = pred.predict(img)
    assert calls == [(3, 3, 32, 32)]  # every face of the image in one onnxruntime call
    clipped = [(5, 10, 35, 40), (70, 20, 110, 70), (100, 60, 120, 90)]
    ref = reference_probs(to_input([prepare_face(img, b, 0.25, 32) for b in clipped]))
    for i, f in enumerate(faces):
        assert f.box == clipped[i]
        assert f.det_score == pytest.approx(0.5 + 0.1 * i)
        np.testing.assert_allclose(list(f.age_probs.values()), ref["age_probs"][i], atol=1e-5)


def test_flip_averages_each_face_with_its_mirror(model):
    img = _image()
    plain = Predictor(model, detector="none").predict(img)[0]
    flipped = Predictor(model, detector="none", flip=True)
    f = flipped.predict(img)[0]
    x = to_input([prepare_precropped(img, 32)])
    ref = {k: (a + b) / 2 for (k, a), b in zip(reference_probs(x).items(), reference_probs(x[..., ::-1]).values())}
    np.testing.assert_allclose(list(f.age_probs.values()), ref["age_probs"][0], atol=1e-5)
    assert f.gender_score == pytest.approx(ref["gender_probs"][0].max(), abs=1e-5)
    assert not np.allclose(list(f.age_probs.values()), list(plain.age_probs.values()), atol=1e-3)
    # so a face and its mirror image get the same answer
    mirrored = flipped.predict(np.ascontiguousarray(img[:, ::-1]))[0]
    np.testing.assert_allclose(list(mirrored.age_probs.values()), list(f.age_probs.values()), atol=1e-5)


@pytest.mark.parametrize("task", ["age", "gender"])
def test_flip_works_for_single_task_models(task, tmp_path):
    path = build_contract_model(tmp_path / f"{task}.onnx", task=task, input_size=32)
    img = _image()
    pred = Predictor(path, detector="none", flip=True)
    f, m = pred.predict(img)[0], pred.predict(np.ascontiguousarray(img[:, ::-1]))[0]
    x = to_input([prepare_precropped(img, 32)])
    name = f"{task}_probs"
    ref = (reference_probs(x, task)[name] + reference_probs(x[..., ::-1], task)[name]) / 2
    got = list(f.age_probs.values()) if task == "age" else [f.gender_score]
    want = ref[0] if task == "age" else [ref[0].max()]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (f.gender is None) == (task == "age") and (f.age is None) == (task == "gender")
    assert (f.age, f.gender) == (m.age, m.gender)


def test_min_face_size_drops_small_detections(model):
    pred = Predictor(model, detector=FixedDetector([(0, 0, 10, 10), (20, 20, 60, 60)]), min_face_size=20)
    assert [f.box for f in pred.predict(_image())] == [(20, 20, 60, 60)]


def test_path_input_and_to_dict_is_json_ready(model, tmp_path):
    import cv2

    path = tmp_path / "face.png"
    cv2.imwrite(str(path), cv2.cvtColor(_image(), cv2.COLOR_RGB2BGR))
    faces = Predictor(model, detector="none").predict(path)
    d = json.loads(json.dumps(faces[0].to_dict()))
    assert list(d) == ["box", "det_score", "age", "age_probs", "gender", "gender_score"]
    assert d["box"] == [0, 0, 120, 90] and set(d["age_probs"]) == set(AGE_GROUPS)
    assert sum(d["age_probs"].values()) == pytest.approx(1.0, abs=1e-3)


def test_grey_and_rgba_arrays(model):
    pred = Predictor(model, detector="none")
    grey = np.full((40, 40), 200, np.uint8)
    rgba = np.dstack([np.full((40, 40, 3), 200, np.uint8), np.zeros((40, 40), np.uint8)])
    assert pred.predict(grey)[0].age_probs == pytest.approx(pred.predict(rgba)[0].age_probs)
    with pytest.raises(ValueError, match="uint8"):
        pred.predict(np.zeros((4, 4, 3), np.float32))


def test_one_session_per_model_for_the_process(model):
    a, b = Predictor(model, detector="none"), Predictor(str(model), detector="haar")
    assert a.classifier is b.classifier


def test_age_only_model_gives_no_gender(tmp_path):
    path = build_contract_model(tmp_path / "age.onnx", task="age")
    f = Predictor(path, detector="none").predict(_image())[0]
    assert f.age in AGE_GROUPS and f.gender is None and f.gender_score is None
    assert f.to_dict()["gender"] is None


def test_model_from_env_and_clear_error_without_default(model, monkeypatch):
    monkeypatch.setattr(predictor_mod, "default_model_path", lambda: None)
    with pytest.raises(ModelError, match="pass --model"):
        Predictor(detector="none")
    monkeypatch.setenv("AGEGENDER_MODEL", str(model))
    assert Predictor(detector="none").model_path == model


@pytest.mark.parametrize("kwargs, message", [
    (dict(drop_keys=["crop_margin"]), "metadata lacks crop_margin"),
    (dict(drop_keys=["agegender_format", "age_groups"]), "not an agegender model"),
    (dict(task="age", metadata={"task": "both"}), "needs outputs"),
    (dict(age_classes=7), "7 classes"),
    (dict(metadata={"genders": '["female", "male"]'}), "genders"),
    (dict(metadata={"input_size": "64"}), "does not match"),
    (dict(metadata={"agegender_format": "2"}), "not supported"),
])
def test_model_with_bad_metadata_is_refused(tmp_path, kwargs, message):
    path = build_contract_model(tmp_path / "bad.onnx", **kwargs)
    with pytest.raises(ModelError, match=message):
        Predictor(path, detector="none")


def test_not_an_onnx_file_is_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("not a model")
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        Predictor(path, detector="none")
    with pytest.raises(ModelError, match="no such model file"):
        Predictor(tmp_path / "absent.onnx", detector="none")


def test_threads_reach_the_onnxruntime_session(model):
    pred = Predictor(model, detector="none", threads=1)
    assert pred.classifier.session.get_session_options().intra_op_num_threads == 1
    two = Predictor(model, detector="none", threads=2).classifier.session.get_session_options()
    assert two.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # idle threads sleep
    assert Predictor(model, detector="none", threads=1).classifier is pred.classifier
