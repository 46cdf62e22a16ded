"""The CPU compatibility layer. Each check runs in a fresh interpreter, since installing it is
process-wide and irreversible."""

import subprocess
import sys
import textwrap

from helpers.run import REPO


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cuda_device_arguments_land_on_the_cpu():
    out = run_python("""
        import torch
        from megatron_foresight.runtime import compat
        compat.install()
        a = torch.zeros(2, device="cuda")
        b = torch.tensor([1.0], device=torch.device("cuda", 0))
        c = torch.empty(3, device=torch.cuda.current_device())
        d = torch.ones(2).cuda().to("cuda:0")
        print(a.device, b.device, c.device, d.device)
        print(torch.ones(1).type(), torch.ones(1, dtype=torch.bfloat16).type())
    """)
    assert out.splitlines() == [
        "cpu cpu cpu cpu", "torch.cuda.FloatTensor torch.cuda.BFloat16Tensor"]


def test_device_mode_off_suspends_the_mode_for_a_block_and_restores_it():
    out = run_python("""
        import torch
        from megatron_foresight.runtime import compat
        compat.install()
        with compat.device_mode_off():
            try:
                torch.zeros(1, device="cuda")
                print("allocated")
            except (AssertionError, RuntimeError):
                print("refused")  # loud: no silent CUDA literal inside the block
        print(torch.zeros(1, device="cuda").device)
        class Through(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))
        with Through():  # a mode above ours (a profiler's) is never popped
            with compat.device_mode_off():
                print(torch.zeros(1, device="cuda").device)
    """)
    assert out.splitlines() == ["refused", "cpu", "cpu"]


def test_cuda_seed_really_seeds_the_cpu_generator_and_tracker_forks_it():
    out = run_python("""
        import torch
        from megatron_foresight.runtime import compat
        compat.install()
        torch.cuda.manual_seed(7); a = torch.rand(3)
        torch.manual_seed(7); b = torch.rand(3)
        print(torch.equal(a, b))
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        tracker = get_cuda_rng_tracker()
        tracker.add("stream", 99)
        torch.manual_seed(1)
        with tracker.fork("stream"):
            x = torch.rand(2)
        y = torch.rand(2)
        torch.manual_seed(1); z = torch.rand(2)
        torch.manual_seed(99); w = torch.rand(2)
        print(torch.equal(y, z), torch.equal(x, w))
    """)
    assert out.split() == ["True", "True", "True"]


def test_streams_events_and_nvtx_are_inert():
    out = run_python("""
        import torch
        from megatron_foresight.runtime import compat
        compat.install()
        s = torch.cuda.Stream(); e = torch.cuda.Event(enable_timing=True); e2 = torch.cuda.Event()
        e.record(); e2.record()
        with torch.cuda.stream(s):
            s.wait_stream(torch.cuda.current_stream())
        torch.cuda.synchronize(); torch.cuda.nvtx.range_push("x"); torch.cuda.nvtx.range_pop()
        print(e.query(), e.elapsed_time(e2) >= 0)
    """)
    assert out.split() == ["True", "True"]


def test_refuses_to_install_when_cuda_is_available_mocked():
    """No GPU here: CUDA's presence is mocked, to show the layer never activates on a cluster."""
    out = run_python("""
        import torch
        torch.cuda.is_available = lambda: True
        from megatron_foresight.runtime import compat
        try:
            compat.install()
        except RuntimeError as e:
            print("refused:", "must not be installed when CUDA is available" in str(e))
        print(compat.is_installed())
    """)
    assert out.split() == ["refused:", "True", "False"]
