"""The fast paths learn as the plain ones do: bf16 autocast training against fp32, a bf16 teacher's soft targets
against fp32 ones, channels_last batches against contiguous ones (correctness is not traded for speed)."""
import pytest
import torch
import torch.nn.functional as F

from distillation_lab.runs import run_training
from distillation_lab.teacher import FrozenTeacher
from pruning_lab.data import load_splits
from pruning_lab.data.loader import BatchLoader
from pruning_lab.models import create_model
from pruning_lab.runtime import bf16_is_native, channels_last_is_safe, resolve_precision, tune_cpu_allocator
from pruning_lab.train.loop import channels_last_for


@pytest.mark.e2e
def test_bf16_training_reaches_the_fp32_accuracy(tiny):
    """The same short run on the embedded digits in fp32 and in bf16 autocast (what `auto` picks where the
    device has native bf16): both learn, and to the same accuracy within the noise of 1,000 test digits."""
    common = dict(epochs=5, train_subset=1024, model_args={"width": 8}, lr=0.1, seed=0)
    fp32 = run_training(tiny(name="fp32", precision="fp32", **common))
    bf16 = run_training(tiny(name="bf16", precision="bf16", **common))
    assert fp32["test_acc"] > 0.9 and bf16["test_acc"] > 0.9, (fp32["test_acc"], bf16["test_acc"])
    assert abs(fp32["test_acc"] - bf16["test_acc"]) < 0.03, (fp32["test_acc"], bf16["test_acc"])


def test_auto_precision_is_bf16_exactly_where_it_is_native():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if bf16_is_native(cpu) else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"


def test_bf16_teacher_gives_the_fp32_soft_targets():
    """A bf16 teacher's soft targets at T = 4: the same top class and a KL to the fp32 ones far below the KD
    loss's own scale."""
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 1, 28, width=16)
    with torch.no_grad():  # a trained-looking teacher: confident logits, not near-uniform ones
        model.fc.weight.mul_(20)
    spec, train, _, _ = load_splits("mnist_embedded", "data", 100, 256)
    x, _ = next(iter(BatchLoader(train, spec, 256, "cpu")))
    exact = FrozenTeacher(model, torch.device("cpu"), dtype=torch.float32)(x)[0]
    same = create_model("resnet18", 10, 1, 28, width=16)
    same.load_state_dict(exact_state(model))
    approx = FrozenTeacher(same, torch.device("cpu"), dtype=torch.bfloat16)(x)[0]
    assert approx.dtype == torch.float32  # the loss sees float32 either way
    assert (approx.argmax(1) == exact.argmax(1)).float().mean() > 0.98
    kl = F.kl_div(F.log_softmax(approx / 4, 1), F.log_softmax(exact / 4, 1), log_target=True, reduction="batchmean")
    assert kl < 1e-3, kl


def test_teacher_with_folded_batch_norms_computes_the_same_function():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 1, 28, width=16)
    model.train()
    for _ in range(3):  # batch-norm statistics that are not the initial ones
        model(torch.randn(32, 1, 28, 28))
    model.eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        logits, features = model(x)
    teacher = FrozenTeacher(model, torch.device("cpu"), dtype=torch.float32)
    assert teacher.forward is not teacher.model  # folded
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.forward.modules())
    got_logits, got_features = teacher(x)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_features, features):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def exact_state(model):
    return {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def test_channels_last_batches_hold_the_same_images_and_give_the_same_outputs():
    spec, train, _, _ = load_splits("mnist_embedded", "data", 100, 256)
    plain = BatchLoader(train, spec, 64, "cpu", train=True, augment=True, seed=3, max_steps=2)
    fast = BatchLoader(train, spec, 64, "cpu", train=True, augment=True, seed=3, max_steps=2, channels_last=True)
    model = create_model("resnet8", 10, 1, 28, width=8).eval()
    for (xa, ya), (xb, yb) in zip(plain.epoch(0), fast.epoch(0)):
        assert xb.is_contiguous(memory_format=torch.channels_last) and torch.equal(xa, xb) and torch.equal(ya, yb)
        if not channels_last_is_safe(torch.device("cpu")):
            continue  # an AVX2-only CPU: the loop never runs models channels_last there (runtime.py says why)
        with torch.no_grad():
            torch.testing.assert_close(model(xa)[0], model.to(memory_format=torch.channels_last)(xb)[0],
                                       rtol=1e-4, atol=1e-4)
        model.to(memory_format=torch.contiguous_format)


def test_channels_last_only_where_the_device_runs_it_safely():
    spec, _, _, _ = load_splits("mnist_embedded", "data", 100, 256)
    cpu_is_avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert channels_last_for(spec, torch.device("cpu")) == cpu_is_avx512
    assert channels_last_for(spec, torch.device("cuda"))


def test_the_cpu_allocator_setting_is_applied_once_where_glibc_has_it():
    first = tune_cpu_allocator()
    assert tune_cpu_allocator() is first  # cached: set once per process
    import sys
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            return
        assert first is True
