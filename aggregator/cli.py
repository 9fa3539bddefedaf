"""``edgetrain aggregate``: the server side of a fleet, over a broker."""
from __future__ import annotations

import argparse
import functools
import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any, Mapping

from edgetrain.sdk.bundle import load_manifest, read_initial_parameters
from edgetrain.sdk.cli_args import add_broker_args, broker_config, limit_threads, positive_float, positive_int
from edgetrain.sdk.config_file import add_config_arg
from edgetrain.sdk.data import load_split, to_model_input
from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.runtime import load_runtime, runtime_available, select_bundle
from edgetrain.sdk.transport import MqttTransport
from edgetrain.sdk.wire import signing

from .config import AggregatorConfig
from .coordinator import Coordinator, WorkerPool
from .fedbuff import DEFAULT_MAX_STALENESS, DEFAULT_STALENESS_WEIGHT, FedBuff
from .fedbuff_service import BufferedAggregator
from .large_batch import LargeBatch
from .progress import round_printer
from .robust_strategy import AggregationRule, with_aggregation
from .run_dir import prepare_run_dir
from .server_optim import LargeBatchHyper
from .secure_rounds import add_secure_aggregation_args, secure_aggregation_from_args
from .service import Aggregator
from .strategy import make_strategy


def add_round_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``aggregate`` and ``simulate``: strategy, selection, local training, validation."""
    # Over 50 lines: a flat list of flag declarations, one group as --help shows it; nothing to split.
    g = p.add_argument_group("rounds")
    g.add_argument("--rounds", "--steps", type=positive_int, default=None,
                   help="rounds to run; steps for large-batch (default 10 rounds, 600 steps)")
    g.add_argument("--strategy", default="fedavg",
                   help="fedavg | fedprox | fedavgm | fedadam | fedyogi | fedadagrad | fedbuff | large-batch "
                        "(default fedavg)")
    g.add_argument("--aggregation", default="mean",
                   help="how the round's updates combine (FL strategies): mean | median | trimmed-mean:beta=B | "
                        "multi-krum:f=F[,m=M] | norm-bound:max=M (default mean; median, trimmed mean and Krum "
                        "hold every update of a round in memory)")
    g.add_argument("--fraction", type=positive_float, default=1.0, help="C: share of live devices per round (default 1)")
    g.add_argument("--min-devices", type=positive_int, default=2, help="M: fewer updates → the round is retried (default 2)")
    g.add_argument("--round-timeout", type=positive_float, default=120.0, help="round deadline in seconds (default 120)")
    g.add_argument("--join-timeout", type=positive_float, default=180.0,
                   help="seconds to wait for M live devices before a round (default 180)")
    g.add_argument("--broker-outage", type=positive_float, default=300.0,
                   help="seconds an announcement waits for a broker that is down before the run fails (default 300)")
    g.add_argument("--local-epochs", type=positive_int, default=1, help="E (default 1)")
    g.add_argument("--local-steps", type=positive_int, default=None,
                   help="exactly K local steps per round instead of E epochs (FL only)")
    g.add_argument("--batch-size", type=positive_int, default=32, help="B (default 32)")
    g.add_argument("--lr", type=positive_float,
                   help="device learning rate (default: the bundle's, set by 'export --lr', else 0.05)")
    g.add_argument("--momentum", type=float, help="device SGD momentum (default: the bundle's, else 0.9)")
    g.add_argument("--prox-mu", type=float, default=0.01, help="FedProx mu (fedprox only; default 0.01)")
    g.add_argument("--server-lr", type=positive_float, help="server learning rate (fedavgm, fedadam…)")
    g.add_argument("--server-momentum", type=float, help="server momentum (fedavgm)")
    g.add_argument("--codec", default="dense", help="uplink codec spec NAME[:k=v,…] (default dense)")
    g.add_argument("--downlink-codec", default="dense", help="codec of the announced deltas (default dense)")
    g.add_argument("--resync-every", type=positive_int,
                   help="announce the whole model every K versions, deltas in between (default: FL 1, large-batch 100)")
    g.add_argument("--eval-every", type=positive_int, help="evaluate every K rounds (default: FL 1, large-batch 50)")
    g.add_argument("--checkpoint-every", type=positive_int,
                   help="checkpoint every K rounds (default: FL 1, large-batch 50)")
    lb = p.add_argument_group("large batch (--strategy large-batch)")
    lb.add_argument("--lb-optimizer", choices=["sgd", "lars"], default="sgd", help="server optimizer (default sgd)")
    lb.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    lb.add_argument("--weight-decay", type=float, help="L2 weight decay (default: the bundle's, else 0)")
    lb.add_argument("--trust-coefficient", type=positive_float, default=0.001, help="LARS trust coefficient η")
    lb.add_argument("--scale-lr", action="store_true",
                    help="linear scaling rule: lr × (devices·batch)/batch (Goyal et al. 2017)")
    lb.add_argument("--warmup-steps", type=int, default=0, help="gradual warm-up to the scaled lr over K steps")
    lb.add_argument("--backup-devices", type=int, default=0,
                    help="ask K extra devices and step with the first gradients (Chen et al. 2016)")
    add_fedbuff_args(p)
    add_dp_args(p)
    add_secure_aggregation_args(p)
    g.add_argument("--max-norm", type=positive_float, help="reject updates whose L2 norm exceeds this")
    g.add_argument("--max-examples", type=positive_int, help="cap the example count a device may claim")
    g.add_argument("--signing-key", type=Path, metavar="FILE.pem",
                   help="sign every announcement with this Ed25519 key (created, with FILE.pem.pub for the devices' "
                        "--aggregator-key, when missing; simulate: one per run directory by default)")
    g.add_argument("--workers", type=positive_int, default=1,
                   help="aggregation worker processes sharing the updates (default 1: one process; FedAvg family)")
    g.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    g.add_argument("--eval-examples", type=positive_int, help="evaluate on the first N test examples only")
    g.add_argument("--data-dir", type=Path, help="Fashion-MNIST IDX directory")
    g.add_argument("--threads", type=positive_int, help="intra-op threads for evaluation")


def add_fedbuff_args(p: argparse.ArgumentParser) -> None:
    """FedBuff (Nguyen et al. 2022; ``aggregator.fedbuff``): buffered asynchronous rounds."""
    fb = p.add_argument_group("buffered asynchronous FL (--strategy fedbuff)")
    fb.add_argument("--buffer", type=positive_int, metavar="K", help="step every K received updates (default 10)")
    fb.add_argument("--max-staleness", type=int, metavar="S",
                    help=f"reject (too_stale) updates trained from a model more than S versions old "
                         f"(default {DEFAULT_MAX_STALENESS})")
    fb.add_argument("--staleness-weight", metavar="poly:a=A|const",
                    help=f"weight of an update s versions old: 1/(1+s)^A or 1 (default {DEFAULT_STALENESS_WEIGHT})")


def _fedbuff_from_args(args: argparse.Namespace, rule: AggregationRule, kwargs: dict[str, Any]) -> FedBuff:
    """``--strategy fedbuff``; refuses what it cannot combine with (robust rules, DP, workers)."""
    if rule != AggregationRule():
        raise ConfigError(f"--aggregation {rule} needs a whole synchronous round; fedbuff steps on a buffer")
    if getattr(args, "workers", 1) != 1:
        raise ConfigError("fedbuff runs in one aggregator process; drop --workers")
    if args.server_momentum is not None:
        raise ConfigError("fedbuff's server step is w + server_lr x buffered mean; --server-momentum does not apply")
    return FedBuff(buffer_size=args.buffer if args.buffer is not None else 10,
                   max_staleness=args.max_staleness if args.max_staleness is not None else DEFAULT_MAX_STALENESS,
                   staleness_weight=args.staleness_weight or DEFAULT_STALENESS_WEIGHT, **kwargs)


def add_dp_args(p: argparse.ArgumentParser) -> None:
    """DP-FedAvg (McMahan et al. 2018; ``aggregator.dp``): off unless --dp-noise-multiplier or --dp-clip is given."""
    dp = p.add_argument_group("differential privacy (DP-FedAvg; needs the server extra's dp-accounting)")
    dp.add_argument("--dp-clip", type=float, metavar="S", help="clip every update to L2 norm S (initial S if adaptive)")
    dp.add_argument("--dp-noise-multiplier", type=float, metavar="Z",
                    help="Gaussian noise N(0, (Z·S)²) on the sum of clipped updates")
    dp.add_argument("--dp-delta", type=float, metavar="D", default=1e-5,
                    help="report ε at this δ, per round in metrics and in the summary (default 1e-5)")
    dp.add_argument("--dp-adaptive-clip", type=float, metavar="QUANTILE",
                    help="adapt S to this quantile of the update norms (Andrew et al. 2021), e.g. 0.5")
    dp.add_argument("--dp-clip-lr", type=float, default=0.2, help="adaptive clipping's learning rate (default 0.2)")
    dp.add_argument("--dp-clip-count-stddev", type=float,
                    help="noise on the adaptive clipped count (default: devices per round / 20)")


def dp_config_from_args(args: argparse.Namespace):
    """The run's ``DPConfig``, or None when no DP flag was given; ConfigError names what cannot hold."""
    clip, noise = getattr(args, "dp_clip", None), getattr(args, "dp_noise_multiplier", None)
    if clip is None and noise is None:
        if getattr(args, "dp_adaptive_clip", None) is not None or getattr(args, "dp_clip_count_stddev", None):
            raise ConfigError("--dp-adaptive-clip needs --dp-clip S (the initial bound) and --dp-noise-multiplier Z")
        return None
    if clip is None:
        raise ConfigError("--dp-noise-multiplier needs --dp-clip S: noise without clipping bounds nothing")
    if noise is None:
        raise ConfigError("--dp-clip needs --dp-noise-multiplier Z: clipping alone is no privacy guarantee "
                          "(for clipping alone use --max-norm)")
    if args.strategy == LARGE_BATCH:
        raise ConfigError("DP-FedAvg is for FL strategies; large-batch steps on gradients (that is DP-SGD)")
    if args.strategy == FEDBUFF:
        raise ConfigError("DP-FedAvg's accountant assumes synchronous rounds; it is not combined with fedbuff")
    if getattr(args, "aggregation", None) not in (None, "mean"):
        raise ConfigError(f"DP-FedAvg adds noise calibrated to a mean; --aggregation {args.aggregation} "
                          "has another sensitivity; use one or the other")
    from .dp import DPConfig  # lazy: dp-accounting comes with the server extra, not on a board

    return DPConfig(clip_norm=clip, noise_multiplier=noise, delta=args.dp_delta,
                    target_quantile=args.dp_adaptive_clip, clip_lr=args.dp_clip_lr,
                    clip_count_stddev=args.dp_clip_count_stddev)


def add_run_dir_args(p: argparse.ArgumentParser) -> None:
    """What to do with an --out that holds an earlier run (refused without one of these)."""
    p.add_argument("--resume", action="store_true", help="continue from the last completed round in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier run in --out")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("aggregate", help="run rounds for a fleet over a broker",
                              description="Run federated rounds: choose devices, announce, collect and validate "
                                          "updates, aggregate, evaluate, checkpoint.")
    add_config_arg(p)
    add_broker_args(p)
    p.add_argument("--fleet", required=True, help="fleet name")
    p.add_argument("--bundle", required=True, type=Path, help="training bundle directory")
    p.add_argument("--out", type=Path, default=Path("runs/aggregate"), help="run directory (default runs/aggregate)")
    add_run_dir_args(p)
    add_round_args(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=run)


LARGE_BATCH = "large-batch"
FEDBUFF = "fedbuff"
# The optimizer settings a run takes from the bundle's manifest when no flag or config gives them, and
# the values used when the bundle has none either.
FALLBACK_OPTIMIZER = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}


def take_bundle_optimizer(args: argparse.Namespace, optimizer: Mapping[str, Any]) -> list[str]:
    """Fill lr / momentum / weight decay not given by a flag or config from the bundle's optimizer
    settings (what ``export`` stored in its manifest); returns a warning for each given value that
    differs from the bundle's."""
    warnings = []
    for name in FALLBACK_OPTIMIZER:
        stored = optimizer.get(name)
        if not isinstance(stored, (int, float)) or isinstance(stored, bool):
            continue
        given = getattr(args, name)
        if given is None:
            setattr(args, name, float(stored))
        elif not math.isclose(float(given), float(stored)):
            flag = "--" + name.replace("_", "-")
            warnings.append(f"{flag} {given:g} differs from the bundle's {name} {float(stored):g} "
                            f"(stored by export); using {given:g}")
    return warnings


def bundle_optimizer(bundle: Path) -> Mapping[str, Any]:
    """The optimizer settings in ``bundle``'s manifest (any runtime of a multi-runtime directory)."""
    return load_manifest(select_bundle(bundle)).optimizer


def resolve_defaults(args: argparse.Namespace) -> None:
    """Defaults that depend on the strategy (a large-batch step is far cheaper than a round) or on
    nothing else having given them (the optimizer's)."""
    for name, fallback in FALLBACK_OPTIMIZER.items():
        if getattr(args, name, None) is None:
            setattr(args, name, fallback)
    lb = args.strategy == LARGE_BATCH
    for name, fl, lbv in (("rounds", 10, 600), ("eval_every", 1, 50), ("checkpoint_every", 1, 50),
                          ("resync_every", 1, 100)):
        if getattr(args, name) is None:
            setattr(args, name, lbv if lb else fl)


def make_strategy_from_args(args: argparse.Namespace, shapes: list[tuple[int, ...]] | None = None):
    """The strategy the flags ask for: a robust rule around it (``--aggregation``), DP-FedAvg around that
    (``--dp-*``; the two together are refused by the DP configuration)."""
    dp_config = dp_config_from_args(args)
    strategy = _base_strategy_from_args(args, shapes)
    if dp_config is None:
        return strategy
    from .dp_strategy import DPFedAvg  # lazy: dp-accounting comes with the server extra, not on a board

    return DPFedAvg(strategy, dp_config)


def _base_strategy_from_args(args: argparse.Namespace, shapes: list[tuple[int, ...]] | None = None):
    rule = AggregationRule.parse(getattr(args, "aggregation", None) or "mean")
    if args.strategy == LARGE_BATCH:
        if rule != AggregationRule():
            raise ConfigError(f"--aggregation {rule} is for FL strategies; large-batch averages its gradients")
        if getattr(args, "local_steps", None) is not None:
            raise ConfigError("--local-steps is for FL strategies; a large-batch device takes one step per round")

        hyper = LargeBatchHyper(optimizer=args.lb_optimizer, base_lr=args.lr, momentum=args.momentum,
                                nesterov=args.nesterov, weight_decay=args.weight_decay,
                                trust_coefficient=args.trust_coefficient, scale_lr=args.scale_lr,
                                reference_batch=args.batch_size, warmup_steps=args.warmup_steps)
        return LargeBatch(shapes or [(1,)], fraction=args.fraction, min_devices=args.min_devices,
                          batch_size=args.batch_size, backup_devices=args.backup_devices, hyper=hyper)
    kwargs: dict[str, Any] = dict(fraction=args.fraction, min_devices=args.min_devices, local_epochs=args.local_epochs,
                                  batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                                  local_steps=args.local_steps)
    if args.strategy == "fedprox":
        kwargs["mu"] = args.prox_mu
    if args.server_lr is not None:
        kwargs["server_lr"] = args.server_lr
    if args.strategy == FEDBUFF:
        return _fedbuff_from_args(args, rule, kwargs)
    if any(getattr(args, name, None) is not None for name in ("buffer", "max_staleness", "staleness_weight")):
        raise ConfigError("--buffer, --max-staleness and --staleness-weight are for --strategy fedbuff")
    if args.server_momentum is not None:
        kwargs["server_momentum"] = args.server_momentum
    return with_aggregation(make_strategy(args.strategy, **kwargs), rule)


def aggregator_config(args: argparse.Namespace, out_dir: Path, fleet: str, resume: bool):
    """The service's settings from parsed flags; ConfigError names a bad one (fleet, codec…)."""
    resolve_defaults(args)
    return AggregatorConfig(fleet=fleet, out_dir=out_dir, rounds=args.rounds, round_timeout_s=args.round_timeout,
                            join_timeout_s=args.join_timeout, seed=args.seed, resume=resume,
                            broker_outage_s=args.broker_outage,
                            expect_devices=getattr(args, "devices", 0) or 0,
                            uplink_codec=args.codec, max_norm=args.max_norm, max_examples=args.max_examples,
                            eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                            resync_every=args.resync_every, downlink_codec=args.downlink_codec,
                            secure_aggregation=secure_aggregation_from_args(args),
                            labels={**(getattr(args, "labels", {}) or {}), **run_settings(args),
                                    "aggregation": str(AggregationRule.parse(getattr(args, "aggregation", None) or "mean"))})


# The flags that shape a run's result, recorded in summary.json so that ``edgetrain report`` groups runs by
# configuration (every setting but the seed) rather than by label text; those of the other method are left out.
_RECORDED_FL = ("local_epochs", "local_steps", "fraction", "server_lr", "server_momentum", "prox_mu")
_RECORDED_LB = ("fraction", "lb_optimizer", "nesterov", "weight_decay", "warmup_steps", "scale_lr", "backup_devices")
_RECORDED_BOTH = ("seed", "batch_size", "lr", "momentum", "eval_every", "resync_every", "limit_examples")


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The result-shaping settings of ``args`` (after ``resolve_defaults``), None ones left out."""
    names = _RECORDED_BOTH + (_RECORDED_LB if args.strategy == LARGE_BATCH else _RECORDED_FL)
    if args.strategy == LARGE_BATCH or args.strategy != "fedprox":
        names = tuple(n for n in names if n != "prox_mu")  # a default that only FedProx reads
    if args.strategy != LARGE_BATCH and getattr(args, "local_steps", None) is not None:
        names = tuple(n for n in names if n != "local_epochs")  # K steps replace E epochs
    values = {name: getattr(args, name, None) for name in names}
    return {k: v for k, v in values.items() if v is not None}


def check_round_args(args: argparse.Namespace, fleet: str) -> None:
    """Fail on a bad strategy, codec or fleet name before any broker or device process is started."""
    resolve_defaults(args)
    make_strategy_from_args(args)
    aggregator_config(args, Path("."), fleet, resume=False)


def signing_key_from_args(args: argparse.Namespace):
    """The announcement signing key of ``--signing-key`` (created with its public half when missing), or None."""
    path = getattr(args, "signing_key", None)
    if path is None:
        return None
    if path.exists():
        return signing.load_private_key(path)
    key = signing.generate_key_pair(path)
    logging.getLogger(__name__).info("new announcement signing key %s; devices verify with --aggregator-key %s",
                                     path, signing.public_key_path(path))
    return key


def build_aggregator(args: argparse.Namespace, broker, out_dir: Path, bundle: Path, fleet: str, resume: bool):
    """The service with its strategy, evaluation runtime and test data, from parsed flags."""


    config = aggregator_config(args, out_dir, fleet, resume)
    # Evaluation runs here on the server: torch where it is installed, from a multi-runtime directory too.
    bundle = select_bundle(bundle, "torch" if (bundle / "torch").is_dir() and runtime_available("torch") else "auto")
    manifest = load_manifest(bundle)
    strategy = make_strategy_from_args(args, manifest.shapes)
    runtime = load_runtime(bundle, manifest)
    limit_threads(runtime, args.threads)
    test = load_split("test", args.data_dir)
    n = args.eval_examples or len(test.labels)
    test_data = (to_model_input(test.images[:n], manifest.input_mean, manifest.input_std), test.labels[:n])
    out_dir.mkdir(parents=True, exist_ok=True)
    # Never clean_start: Mosquitto does not persist a session whose connection asked for a clean start, so
    # a broker restart would drop updates queued for us. A fresh run discards the old session in start().
    # One aggregator per fleet: it can retry the broker every 10 s at most (devices, many, back off to 60 s),
    # so a round resumes within seconds of the broker's return.
    transport = MqttTransport(broker, client_id=f"edgetrain-aggregator-{fleet}", clean_start=False, reconnect_max_s=10.0)
    service = Aggregator if getattr(args, "workers", 1) == 1 else functools.partial(Coordinator, num_workers=args.workers)
    if isinstance(strategy, FedBuff):
        service = BufferedAggregator
    return service(config, strategy, transport, runtime, read_initial_parameters(bundle, manifest), test_data,
                   signing_key=signing_key_from_args(args))


def start_worker_pool(args: argparse.Namespace, broker, out_dir: Path, fleet: str):
    """The aggregation worker processes of ``--workers K`` (K > 1), else None; stop it when the run ends."""
    return WorkerPool(broker, fleet, args.workers, out_dir).start() if getattr(args, "workers", 1) > 1 else None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s aggregator %(levelname)s %(message)s")
    prepare_run_dir(args.out, args.resume, args.overwrite)
    for warning in take_bundle_optimizer(args, bundle_optimizer(args.bundle)):
        logging.getLogger(__name__).warning(warning)
    aggregator = build_aggregator(args, broker_config(args), args.out, args.bundle, args.fleet, args.resume)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    pool = start_worker_pool(args, broker_config(args), args.out, args.fleet)
    try:
        records = aggregator.run(stop, on_progress=round_printer("step" if args.strategy == LARGE_BATCH else "round"))
    finally:
        if pool is not None:
            pool.stop()
    final = records[-1] if records else None
    if final is not None and final.accuracy is not None:
        print(f"final test accuracy {100 * final.accuracy:.2f}% after round {final.round_id}; results in {args.out}")
    return 0
