"""DPSDPipeline on a real transcription run: determinism, output types, labels from the student,
class requests, argument checks and a save/load round trip."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from synthgen.models import Classifier, Generator
from synthgen.pipeline import DPSDPipeline, DPSDPipelineOutput

from .release_runs import release_run


@pytest.fixture(scope="module")
def run_dir(small_teacher, mnist_small, tmp_path_factory):
    return release_run("gaussian", small_teacher, mnist_small, tmp_path_factory)


def load_pipeline(run_dir) -> DPSDPipeline:
    return DPSDPipeline(generator=Generator.from_pretrained(run_dir / "generator"),
                        student=Classifier.from_pretrained(run_dir / "student"))


@pytest.fixture
def pipeline(run_dir):
    return load_pipeline(run_dir)


@pytest.fixture
def centred_pipeline(run_dir):
    """The run's pipeline with the student's logits centred on the generator's mean feature.

    A six-iteration run's generator varies little, so its student gives every image one class.
    Setting the output bias to -W h_mean makes the label depend on how each image differs from
    the average one, which spreads the labels over the classes the class-request tests need.
    """
    pipe = load_pipeline(run_dir)
    with torch.no_grad():
        latents = torch.randn(512, pipe.generator.config.latent_dim, generator=torch.Generator().manual_seed(99))
        mean_feature = pipe.student.embed(pipe.generator(latents)).mean(dim=0)
        pipe.student.fc2.bias.copy_(-(pipe.student.fc2.weight @ mean_feature))
    return pipe


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_images(pipeline):
    first = pipeline(num_images=40, generator=seeded(3), output_type="pt", batch_size=16)
    second = pipeline(num_images=40, generator=seeded(3), output_type="pt", batch_size=16)
    other = pipeline(num_images=40, generator=seeded(4), output_type="pt", batch_size=16)
    assert isinstance(first, DPSDPipelineOutput)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert torch.equal(first.confidences, second.confidences)
    assert not torch.equal(first.images, other.images)


def test_output_types_agree(pipeline):
    as_pt = pipeline(num_images=6, generator=seeded(0), output_type="pt")
    as_np = pipeline(num_images=6, generator=seeded(0), output_type="np")
    as_pil = pipeline(num_images=6, generator=seeded(0), output_type="pil")
    assert as_pt.images.shape == (6, 1, 28, 28)
    assert as_pt.images.dtype == torch.float32
    assert as_np.images.shape == (6, 28, 28, 1)
    assert as_np.images.dtype == np.float32
    assert len(as_pil.images) == 6
    assert as_pil.images[0].mode == "L"
    assert as_pil.images[0].size == (28, 28)
    assert np.array_equal(as_np.images, as_pt.images.permute(0, 2, 3, 1).numpy())
    pixels = np.stack([np.asarray(image) for image in as_pil.images])
    assert np.array_equal(pixels, np.rint(as_np.images[..., 0] * 255).astype(np.uint8))
    assert np.array_equal(as_np.labels, as_pt.labels.numpy())
    assert as_pil.labels.dtype == np.int64
    assert as_pil.class_names == [str(i) for i in range(10)]


def test_images_are_8_bit(pipeline):
    images = pipeline(num_images=8, generator=seeded(1), output_type="pt").images
    assert torch.equal(images * 255, (images * 255).round())
    assert images.min() >= 0
    assert images.max() <= 1


def test_labels_come_from_student(centred_pipeline):
    output = centred_pipeline(num_images=64, generator=seeded(5), output_type="pt")
    with torch.no_grad():
        probs = F.softmax(centred_pipeline.student(output.images), dim=1)
    assert torch.equal(output.labels, probs.argmax(dim=1))
    assert torch.allclose(output.confidences, probs.max(dim=1).values)
    assert len(set(output.labels.tolist())) > 1


def test_class_labels_fill_each_position(centred_pipeline):
    counts = np.bincount(centred_pipeline(num_images=256, generator=seeded(0), output_type="pt").labels.numpy(),
                         minlength=10)
    common = [int(c) for c in np.argsort(-counts)[:3]]
    request = [common[0], common[1], common[0], common[2], common[1], common[0]]
    output = centred_pipeline(class_labels=request, generator=seeded(7), output_type="pt", batch_size=32)
    assert output.labels.tolist() == request
    again = centred_pipeline(class_labels=request, generator=seeded(7), output_type="pt", batch_size=32)
    assert torch.equal(output.images, again.images)
    with torch.no_grad():
        relabelled = centred_pipeline.student(output.images).argmax(dim=1)
    assert relabelled.tolist() == request


def test_class_labels_by_name(centred_pipeline):
    label = int(centred_pipeline(num_images=1, generator=seeded(0), output_type="pt").labels[0])
    output = centred_pipeline(class_labels=[str(label)] * 3, generator=seeded(2), output_type="np")
    assert output.labels.tolist() == [label] * 3


def test_rare_class_raises_with_counts(pipeline):
    labels = pipeline(num_images=256, generator=seeded(0), output_type="pt").labels
    absent = next(c for c in range(10) if c not in set(labels.tolist()))
    with pytest.raises(ValueError, match=f"still missing {{'{absent}': 2}}"):
        pipeline(class_labels=[absent, absent], generator=seeded(0), max_images_drawn=64, batch_size=32)


@pytest.mark.parametrize("kwargs,message", [
    ({}, "num_images must be an integer >= 1"),
    ({"num_images": 0}, "num_images must be an integer >= 1"),
    ({"num_images": 2, "output_type": "latent"}, "output_type must be one of"),
    ({"num_images": 2, "batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"class_labels": [10]}, "class label 10 is not one of the student's classes"),
    ({"class_labels": ["cat"]}, "class label 'cat' is not one of"),
    ({"class_labels": [True]}, "class label True is not one of"),
    ({"num_images": 3, "class_labels": [1, 2]}, r"num_images \(3\) must equal len\(class_labels\) \(2\)"),
])
def test_invalid_arguments_raise(pipeline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipeline(generator=seeded(0), **kwargs)


def test_sampling_keeps_batchnorm_statistics(pipeline):
    pipeline.generator.train()
    before = {name: buffer.clone() for name, buffer in pipeline.generator.named_buffers()}
    pipeline(num_images=32, generator=seeded(0), output_type="pt")
    for name, buffer in pipeline.generator.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_save_and_load_give_same_samples(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path / "pipe")
    loaded = DPSDPipeline.from_pretrained(tmp_path / "pipe", use_safetensors=True)
    first = pipeline(num_images=10, generator=seeded(11), output_type="pt")
    second = loaded(num_images=10, generator=seeded(11), output_type="pt")
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)


def test_return_dict_false_gives_tuple(pipeline):
    images, labels, confidences = pipeline(num_images=3, generator=seeded(0), output_type="pt", return_dict=False)
    assert images.shape[0] == labels.shape[0] == confidences.shape[0] == 3
