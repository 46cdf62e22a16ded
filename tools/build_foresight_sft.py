#!/usr/bin/env python
"""Write FE-SFT's foresight-format traces from trajectories, by hindsight.

Each agent turn gets a foresight block: the plan (the action taken and what followed; the
action only with --no-plan-ahead, as the tiny recipe's FE-SFT trains), the
rollout (the observation the environment really returned next) and the value (the Monte-Carlo
success estimate of that state, rounded to two decimals), in the foresight format version of
--format (v1: a <foresight> block; v2: <imaginary>, <keyword>, <analysis>, <confidence>,
<action>). Turns that do not parse are kept as they are and counted. The output is trajectory JSONL (schema foresight.trajectory/1), or
webdataset shards when --output names a directory or a %06d pattern.

examples:
  python tools/build_foresight_sft.py --input data/world/trajectories/train.jsonl \\
      --output data/fe_sft/train.jsonl
  python tools/build_foresight_sft.py --input shards/ --output out/fe-%06d.tar
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_foresight.data.records import DataFileError  # noqa: E402
from megatron_foresight.data.trajectory import (  # noqa: E402
    read_trajectories, write_jsonl, write_shards,
)
from megatron_foresight.foresight.formats import FORMATS  # noqa: E402
from plugins.fe_sft.hindsight import foresight_traces  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="trajectories: .jsonl, a .tar shard or a "
                                                  "directory of shards")
    p.add_argument("--output", required=True, help="output .jsonl, or shards (a directory or "
                                                   "a pattern such as out/fe-%%06d.tar)")
    p.add_argument("--format", choices=sorted(FORMATS), default="v1",
                   help="the foresight format version to write (default v1)")
    p.add_argument("--no-plan-ahead", dest="plan_ahead", action="store_false",
                   help="plans name the action only, not what followed it (fe_sft.plan_ahead: "
                        "false, as the tiny recipe trains)")
    args = p.parse_args(argv)
    from tqdm import tqdm

    tally = Counter()
    try:
        traces = foresight_traces(tqdm(read_trajectories(args.input), desc="foresight traces",
                                       unit=" traj", disable=None), tally,
                                  FORMATS[args.format], args.plan_ahead)
        if args.output.endswith(".jsonl"):
            write_jsonl(traces, args.output)
        else:
            write_shards(traces, args.output)
    except (DataFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for what, n in sorted(tally.items()):
        print(f"{n:8d} {what}")
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
