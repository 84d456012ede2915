"""Teachers: training, saving, the formats users may bring, and the pickle refusal."""

import json

import pytest
import torch

from synthgen.data import load_image_data
from synthgen.teacher import META_FILE, TeacherError, TeacherMeta, load_teacher


def make_small_cnn():
    """Factory used through its import path 'tests.test_teacher:make_small_cnn'."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 26 * 26, 10))


def test_trained_teacher_beats_chance(small_teacher, mnist_small):
    meta = json.loads((small_teacher / META_FILE).read_text())
    assert meta["test_accuracy"] > 50  # 600 real images, 2 epochs
    assert meta["num_examples"] == 600
    assert meta["input_shape"] == [1, 28, 28]
    assert meta["dataset_fingerprint"] == load_image_data(mnist_small, "train").fingerprint


def test_saved_teacher_reloads_same_predictions(small_teacher, mnist_small):
    data = load_image_data(mnist_small, "test")
    first = load_teacher(small_teacher, data=data)
    second = load_teacher(small_teacher)
    images = torch.from_numpy(data.images[:16]).float() / 255
    assert torch.equal(first.bank()(images), second.bank()(images))
    assert first.fingerprint == second.fingerprint


def test_safetensors_with_factory(tmp_path, mnist_small):
    from safetensors.torch import save_file

    model = make_small_cnn()
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    data = load_image_data(mnist_small, "train")
    teacher = load_teacher(tmp_path / "weights.safetensors", factory="tests.test_teacher:make_small_cnn", data=data)
    assert teacher.meta.format == "safetensors"
    assert teacher.meta.dataset_fingerprint == data.fingerprint
    with pytest.raises(TeacherError, match="--teacher-factory"):
        load_teacher(tmp_path / "weights.safetensors", data=data)


def test_torchscript_and_export_archives(tmp_path, mnist_small):
    model = make_small_cnn().eval()
    torch.jit.script(model).save(str(tmp_path / "teacher.pt"))
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(model, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    torch.export.save(exported, str(tmp_path / "teacher.pt2"))
    data = load_image_data(mnist_small, "train")
    images = torch.from_numpy(data.images[:4]).float() / 255
    expected = model(images)
    for name, kind in (("teacher.pt", "torchscript"), ("teacher.pt2", "torch.export")):
        teacher = load_teacher(tmp_path / name, data=data)
        assert teacher.meta.format == kind
        assert torch.allclose(teacher.bank()(images)[0], expected, atol=1e-5)


def test_pickle_refused_unless_trusted(tmp_path, mnist_small):
    torch.save(make_small_cnn(), str(tmp_path / "teacher.pth"))
    data = load_image_data(mnist_small, "train")
    with pytest.raises(TeacherError, match="--trust-pickle"):
        load_teacher(tmp_path / "teacher.pth", data=data)
    teacher = load_teacher(tmp_path / "teacher.pth", data=data, trust_pickle=True)
    assert teacher.meta.format == "pickle"


def test_class_count_mismatch_rejected(tmp_path, mnist_small):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 7))
    torch.jit.script(model).save(str(tmp_path / "seven.pt"))
    data = load_image_data(mnist_small, "train")
    meta = TeacherMeta(input_shape=[1, 28, 28], class_names=[str(i) for i in range(7)])
    with pytest.raises(TeacherError, match="7 classes"):
        load_teacher(tmp_path / "seven.pt", meta=meta, data=data)
    with pytest.raises(TeacherError, match="7 outputs"):
        load_teacher(tmp_path / "seven.pt", data=data)


def test_input_shape_mismatch_rejected(tmp_path, mnist_small):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    torch.jit.script(model).save(str(tmp_path / "rgb.pt"))
    data = load_image_data(mnist_small, "train")
    with pytest.raises(TeacherError, match="failed on images"):
        load_teacher(tmp_path / "rgb.pt", data=data)
    meta = TeacherMeta(input_shape=[3, 32, 32], class_names=[str(i) for i in range(10)])
    with pytest.raises(TeacherError, match=r"\(3, 32, 32\)"):
        load_teacher(tmp_path / "rgb.pt", meta=meta, data=data)


def test_incomplete_weights_rejected(small_teacher, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "teacher"
    shutil.copytree(small_teacher, copy)
    weights = next(copy.glob("*.safetensors"))
    state = load_file(str(weights))
    state.pop(next(iter(state)))
    save_file(state, str(weights))
    with pytest.raises(TeacherError, match="do not match"):
        load_teacher(copy)
