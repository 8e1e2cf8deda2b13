"""selfreward on several nodes of a Ray cluster: `selfreward iterate` on one node (machine 0) and
`selfreward join-training` on each other, for the whole run. Generation and judging run on
machine 0 only; SFT, DPO and SimPO use every node (docs/training.md, "More than one machine").

    ray job submit --working-dir . -- python examples/ray/multinode.py \\
        --runs-dir /shared/runs --nodes 2 --gpus-per-node 8 -- --name big --rounds 3

`--runs-dir` must be an absolute path on a filesystem every node mounts at the same place: Ray
gives each node its own copy of the working dir, so a relative runs/ would be a different folder
on each. The accelerate config is written there too. After `--`: iterate's arguments, with
--name. Each node needs selfreward installed (or `--runtime-env-json` that installs it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

TEMPLATE = Path(__file__).resolve().parent.parent / "accelerate" / "multinode.yaml"


def plan(nodes: list[dict], count: int, gpus: int, runs_dir: str,
         iterate_args: list[str]) -> tuple[str, dict, list[tuple[str, list[str]]]]:
    """From ray.nodes(): where the accelerate config goes, its keys, and (node id, selfreward's
    arguments) for each machine, machine 0 first."""
    chosen = [n for n in nodes if n["Alive"] and n["Resources"].get("GPU", 0) >= gpus][:count]
    if len(chosen) < count:
        raise SystemExit(f"{count} nodes with {gpus} GPUs each asked for, {len(chosen)} alive in the cluster")
    if "--name" not in iterate_args:
        raise SystemExit("give iterate's --name after `--`: the other nodes join that run")
    name = iterate_args[iterate_args.index("--name") + 1]
    path = f"{runs_dir}/{name}-accelerate.yaml"
    config = {**yaml.safe_load(TEMPLATE.read_text()), "main_process_ip": chosen[0]["NodeManagerAddress"],
              "num_machines": count, "num_processes": count * gpus}
    commands = [["iterate", "--runs-dir", runs_dir, "--set", f"accelerate_config={path}", *iterate_args]]
    commands += [["join-training", name, "--runs-dir", runs_dir, "--machine-rank", str(rank)]
                 for rank in range(1, count)]
    return path, config, [(node["NodeID"], command) for node, command in zip(chosen, commands)]


class Machine:
    """One command on one node, as a Ray actor: it holds the node's GPUs while the command runs."""

    def write(self, path: str, config: dict) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "selfreward", *args])

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self) -> int:
        self.proc.terminate()  # join-training's launcher, watching it, ends its ranks
        return self.proc.wait()


def main() -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", required=True, help="absolute path on the shared filesystem")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("iterate_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    iterate_args = args.iterate_args[1:] if args.iterate_args[:1] == ["--"] else args.iterate_args

    ray.init()
    path, config, machines = plan(ray.nodes(), args.nodes, args.gpus_per_node, args.runs_dir, iterate_args)
    actor = ray.remote(Machine)
    first, *others = [actor.options(num_gpus=args.gpus_per_node,
                                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
                      for node, _ in machines]
    ray.get(first.write.remote(path, config))  # written on machine 0: the driver's node may not mount the folder
    ray.get([a.start.remote(command) for a, (_, command) in zip([first, *others], machines)])
    code = ray.get(first.wait.remote())
    ray.get([a.stop.remote() for a in others])
    sys.exit(code)


if __name__ == "__main__":
    main()
