"""The CUDA path, on a GPU: the one-process world is NCCL with the model on the device (no CPU
compatibility layer), the fused decode step and the CUDA-graphed decode step give the module
path's tokens there, and a recipe trains a few steps. Every test here is skipped where torch
sees no GPU (the CPU machines CI runs on); `tools/cuda_check.sh` runs them on a GPU node."""

import pytest
import torch

from megatron_foresight.data.tokenizer import ByteTokenizer
from megatron_foresight.inference.generate import Generator, Sampling

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_one_process_world_is_nccl_on_the_gpu(megatron_cpu):
    import torch.distributed as dist

    from megatron_foresight.runtime import compat
    from test_continuous import _model

    assert megatron_cpu.device == "cuda"
    assert dist.get_backend() == "nccl"
    assert not compat.is_installed()
    model = _model()
    assert all(p.device.type == "cuda" for p in model.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_and_graphed_decode_give_the_module_paths_completions_on_the_gpu(
        megatron_cpu, precision, monkeypatch):
    """From the same prompts, greedy and sampled: Megatron's forward for every decode step, the
    fused step (`inference.fused`) and the CUDA-graphed step (`inference.graphs`, real
    `torch.cuda.CUDAGraph`) draw the same tokens; log-probs agree to rounding."""
    from megatron_foresight.inference import graphs
    from test_continuous import _model

    model = _model([f"model.precision={precision}"])
    tok = ByteTokenizer()
    kinds = {
        "modules": Generator(model, tok, max_sequence_length=320, slot_cache=True,
                             fused_decode=False),
        "fused": Generator(model, tok, max_sequence_length=320, slot_cache=True),
        "graphs": Generator(model, tok, max_sequence_length=320, slot_cache=True,
                            cuda_graphs=True),
    }
    assert kinds["fused"].fused_decode and not kinds["modules"].fused_decode
    captures = []
    capture = graphs.CudaGraphs.capture
    monkeypatch.setattr(graphs.CudaGraphs, "capture",
                        lambda self, run: captures.append(1) or capture(self, run))
    # rows of different lengths; 150 tokens carry the longest past the first key bucket (128)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 101, 102, 103] * 5, [40, 41]]
    tol = 5e-4 if precision == "fp32" else 5e-2
    for sampling in (Sampling(max_new_tokens=150),
                     Sampling(temperature=1.0, max_new_tokens=150, seed=3)):
        got = {k: g.generate(prompts, sampling) for k, g in kinds.items()}
        for k in ("fused", "graphs"):
            assert [c.ids for c in got[k]] == [c.ids for c in got["modules"]], k
            for a, b in zip(got[k], got["modules"]):
                assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                      atol=tol, rtol=0), k
    assert len(captures) >= 2  # a graph per key bucket and call: 128 and 320 at least


def test_a_recipe_trains_and_resumes_on_the_gpu(tmp_path):
    """`foresight train` of the test recipe on the GPU: stopped at step 20 of 30, the loss has
    fallen and the checkpoint of step 20 is written (dist_checkpointing from CUDA tensors);
    `--resume` loads it and trains steps 21-30."""
    from helpers.run import losses, metrics, train

    run_dir = tmp_path / "run"
    over = ["schedule.train_steps=30", "schedule.eval_interval=0", "checkpoint.save_interval=10"]
    train(run_dir, over, extra=["--stop-at-step", "20"])
    first = losses(run_dir)
    assert len(first) == 20 and first[-1] < first[0]
    out = train(run_dir, over, extra=["--resume"]).stdout
    assert "step_0000020" in out
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 31))
