"""What the cluster (or the local Ray about to start) can never do with a config, refused before any stage runs."""

from __future__ import annotations

import logging

import ray

from pipeline.config import Config
from pipeline.ray_startup import ray_target
from stages.common import storage
from stages.common.errors import BadInputError

log = logging.getLogger(__name__)


def check_cluster(config: Config) -> None:
    """Refuses what this cluster can never do, before any stage runs: the one place where the resources a trial or
    stage asks for are checked (for the run's own local Ray too, which has the resources of `ray.*`); how many CPUs
    the evaluate task takes is sized later, by the runner, among the nodes that fit it.

    A trial or stage task needs all its resources on one node: asking for more than any node has, or could have
    once the autoscaler adds the node types it knows, would leave it pending forever. A run folder on a disk that
    only one node sees would break the first time a trial on another node checkpoints.

    Raises:
      BadInputError: naming the setting that cannot be met and what the nodes offer.
    """
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    groups = _autoscaler_node_groups()
    offers = nodes + [resources for resources, _ in groups]
    trial = {"CPU": config.train.cpus_per_trial, "GPU": config.train.gpus_per_trial}
    if not any(fits(trial, offer) for offer in offers):
        local_cpus = config.ray.num_cpus if ray_target(config.ray.address).address is None else None
        if local_cpus is not None and trial["CPU"] > local_cpus:
            raise BadInputError(f"train.cpus_per_trial={trial['CPU']:g} exceeds ray.num_cpus={local_cpus} "
                                "(the CPUs of the run's own Ray)")
        raise BadInputError(
            f"train.cpus_per_trial={trial['CPU']:g} with train.gpus_per_trial={trial['GPU']:g}: no node "
            f"{'has or can get' if groups else 'has'} {_describe(trial)} together (a trial runs on one node; "
            f"the nodes offer {_describe_offers(offers, trial)})"
        )
    for stage, resources in config.ray.stage_resources.items():
        demand = {"CPU": 1.0, **resources}
        if not any(fits(demand, offer) for offer in offers):
            raise BadInputError(
                f"ray.stage_resources.{stage}={dict(resources)}: no node offers {_describe(demand)} together "
                f"(the nodes offer {_describe_offers(offers, demand)})"
            )
    possible_nodes = max(len(nodes), sum(count if count >= 0 else 2 for _, count in groups))
    shared = config.run.shared_filesystem or storage.is_uri(config.run.root)
    if possible_nodes > 1 and not shared:
        raise BadInputError(
            f"run.root={config.run.root!r} is a local folder but the cluster has (or may grow to) {possible_nodes} "
            "nodes: use an s3:// or gs:// run.root, or a folder every node mounts at the same path (NFS) with "
            "run.shared_filesystem=true"
        )


def check_search(config: Config) -> None:
    """Says at the start, before any stage runs, when the search cannot be repeated exactly from the same seed, and
    why (with the cluster's resources known: they decide how many trials run at once)."""
    from stages.train import concurrent_trials
    from stages.training.train_settings import unrepeatable_because

    unrepeatable = unrepeatable_because(config.train, concurrent_trials(config.train))
    if unrepeatable is not None:
        log.warning("%s", unrepeatable)


def fits(demand: dict[str, float], offer: dict[str, float]) -> bool:
    """Whether a node offering `offer` has all of `demand` (resource name -> amount)."""
    return all(amount <= offer.get(resource, 0) for resource, amount in demand.items() if amount > 0)


def _describe(resources: dict[str, float]) -> str:
    return " and ".join(f"{amount:g} {name}" for name, amount in resources.items() if amount > 0) or "nothing"


def _describe_offers(offers: list[dict[str, float]], demand: dict[str, float], limit: int = 6) -> str:
    """Each distinct node's amounts of what `demand` names, e.g. '8 CPU and 0 GPU; 4 CPU and 1 GPU'."""
    distinct = list(dict.fromkeys(
        " and ".join(f"{offer.get(name, 0):g} {name}" for name, amount in demand.items() if amount > 0)
        for offer in offers
    ))
    return "; ".join(distinct[:limit]) + ("; ..." if len(distinct) > limit else "") if distinct else "no nodes"


def _autoscaler_node_groups() -> list[tuple[dict[str, float], int]]:
    """(resources of one node, most nodes) of every node type the autoscaler may start; empty without one."""
    try:
        from ray._private.state import state  # Ray keeps the autoscaler's node types here (no public API yet)

        cluster_config = state.get_cluster_config()
    except Exception:  # an older or newer Ray without it: judge by the nodes that exist
        return []
    if cluster_config is None:
        return []
    return [(dict(group.resources), group.max_count) for group in cluster_config.node_group_configs]
