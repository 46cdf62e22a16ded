"""The CUDA path, on a GPU: the one-process world is NCCL with the model on the device (no CPU
compatibility layer), the fused decode step and the CUDA-graphed decode step give the module
path's tokens there, and a recipe trains a few steps. Every test here is skipped where torch
sees no GPU (the CPU machines CI runs on), the Transformer Engine one also where TE does not
import; `tools/cuda_check.sh` runs them on a GPU node."""

import importlib.util

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


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="needs Transformer Engine")
def test_transformer_engine_attends_each_packed_document_alone_on_the_gpu(megatron_cpu):
    """data.document_masks on Transformer Engine: a sample of three documents, its THD
    boundaries from the loader's collate, gives each document the logits it gets alone from
    position 0 (bf16, TE's kernel); the same tokens without boundaries give other logits."""
    from helpers.run import REPO
    from megatron_foresight.config import load_recipe
    from megatron_foresight.models.provider import build_model
    from megatron_foresight.training.data import collate, packed_seq_params, to_device

    cfg = load_recipe(REPO / "recipes" / "tiny-cpu" / "lm.yaml", [
        "model.transformer_impl=transformer_engine", "model.precision=bf16",
        "data.document_masks=true"])
    (model,) = build_model(cfg, 384)
    model.eval()
    eod, gen = ByteTokenizer().eod, torch.Generator().manual_seed(0)
    lengths = [40, 70, 18]
    docs = [torch.randint(0, 256, (n - 1,), generator=gen).tolist() + [eod] for n in lengths]
    tokens = torch.tensor(sum(docs, []))
    starts = torch.ones_like(tokens, dtype=torch.bool)
    starts[1:] = tokens[:-1] == eod
    batch = to_device(collate([{"tokens": tokens, "document_starts": starts}]),
                      torch.device("cuda"))
    assert batch["cu_seqlens"].tolist() == [0, 40, 110, 128] and not batch["max_seqlen"].is_cuda
    ids = tokens[None].cuda()
    pos = torch.arange(len(tokens), device="cuda")[None]
    with torch.no_grad():
        packed = model(ids, pos, None, packed_seq_params=packed_seq_params(batch)).float()
        causal = model(ids, pos, None).float()
        begin = 0
        for n in lengths:
            alone = model(ids[:, begin:begin + n], pos[:, :n], None).float()
            assert torch.allclose(packed[0, begin:begin + n], alone[0], atol=0.1), begin
            begin += n
    assert not torch.allclose(packed[0, 40:], causal[0, 40:], atol=0.1)
