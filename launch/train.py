"""Distill a student from a teacher with GOLD on DeepSpeed.

    deepspeed --num_gpus N launch/train.py --config ds_configs/<preset>.json [--resume] [KEY=VALUE ...]

KEY=VALUE overrides any preset key by its dotted path (values are JSON, else strings), e.g.
``max_steps=50 distill.beta=0.3 student.deepspeed.optimizer.params.lr=1e-4``.
Works under the deepspeed launcher, torchrun, or any launcher that sets RANK/WORLD_SIZE/MASTER_ADDR.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gold_ds.config import ConfigError, load_config  # noqa: E402


def _config_error(e) -> int:
    """One message for the whole run, exit code 2: every rank finds the same error and rank 0 prints
    it; the other ranks wait a moment first, as a launcher stops the whole group at the first exit."""
    if os.environ.get("RANK", "0") == "0":
        print(f"gold_ds: {e}", file=sys.stderr)
    else:
        time.sleep(5)
    return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a JSON preset, e.g. ds_configs/demo-cpu.json")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="preset overrides by dotted key")
    args = parser.parse_intermixed_args(argv)  # --resume before or after the overrides
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _config_error(e)

    import torch
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    import torch.distributed as dist
    from gold_ds.data import BadRowError
    from gold_ds.trainer import build_trainer
    from gold_ds.trainer.stop import (EXIT_LOST_RANK, EXIT_NON_FINITE, EXIT_PREEMPTED, NonFiniteValues, Preempted,
                                      is_collective_failure, lost_ranks)
    trainer = None
    try:
        trainer = build_trainer(cfg, resume=args.resume)  # checks that need tokenizers, data, the world size
        trainer.train()
    except (ConfigError, BadRowError) as e:
        return _config_error(e)
    except Preempted:
        return EXIT_PREEMPTED  # every rank stopped after the same step, with a checkpoint
    except NonFiniteValues as e:  # found by every rank together: one message
        if os.environ.get("RANK", "0") == "0":
            print(f"gold_ds: {e}", file=sys.stderr, flush=True)
        return EXIT_NON_FINITE
    except Exception as e:  # noqa: BLE001 - a lost rank is one line; anything else keeps its traceback
        if not is_collective_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        gone = lost_ranks()
        who = (f"rank(s) {gone} exited" if gone else
               f"a rank on another node died, or one did not answer within timeout_s={cfg.timeout_s}")
        when = f"during step {trainer.step + 1}" if trainer is not None else "while starting"
        print(f"gold_ds: rank {os.environ.get('RANK', '0')}: lost the other ranks {when}: {who} "
              f"({type(e).__name__}: {first[:200]}); --resume continues from the last checkpoint",
              file=sys.stderr, flush=True)
        return EXIT_LOST_RANK
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # a hard exit: after gloo autograd collectives the interpreter's own teardown sometimes aborts
    # ("terminate called without an active exception") although the run completed
    os._exit(code)
