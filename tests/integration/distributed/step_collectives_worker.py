"""One rank of test_step_collectives.py (torchrun, gloo, CPU): for each "case/layout" name given, build
layout_case's model for the case under the layout, train the case's steps and gather the parameters;
rank 0 writes {name: record} to --out. Collectives time out after 60 s, so a rank left waiting fails
instead of hanging."""

import argparse
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import layout_case as case

from forgerl.distributed import full_state_dict


def main() -> None:
    args, layouts = case.start_worker(argparse.ArgumentParser(), timeout=timedelta(seconds=60))
    results = {}
    for name, values in layouts.items():
        mtp_modules, step_config, step_batches = case.step_case(name.split("/")[0])
        parallel, _ = case.parallel_model(values, mtp_modules)
        opt = case.optimizer(parallel.model)
        record = case.run_steps(
            parallel.train_model, parallel.model, opt, step_config=step_config, step_batches=step_batches
        )
        record["state"] = full_state_dict(parallel)
        results[name] = record
    case.write_results(results, args.out)


if __name__ == "__main__":
    main()
