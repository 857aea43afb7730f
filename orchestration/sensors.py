"""Sensors: DFT results folder, new surrogates in the registry.

* ``dft_results_sensor`` watches the DFT results folder (``DftResource.results_dir``: from
  ``CGWGAN_DFT_RESULTS``, default ``<home>/dft/results``). A run folder is requested once it
  holds outputs and has not changed for ``settle_seconds``; the cursor remembers each folder's
  file signature, so a folder is sent again only when its files change (and ``dft_results`` itself skips contents it already holds).
  A folder that escapes the root is passed on too, so it lands as a ``refused`` row with its reason.
* ``surrogate_registry_sensor`` reads the registry file (``CGWGAN_SURROGATES``) and the model
  folders (``CGWGAN_M3GNET_DIR``). A surrogate that appears (or whose weights change) is added to
  the ``surrogate`` partitions (the default chemical system to ``chemical_system``), and one
  re-screening run is requested per chemical system that has candidates (``candidates_dedup``);
  the cursor remembers which (system, surrogate, weights) were requested, so a system whose
  candidates appear later is screened then. When a system's shortlists change and it has at least
  two surrogates, a ``surrogate_churn`` run is requested. Without a registry file it does nothing
  (the built-in surrogates are screened by explicit runs or the weekly schedule).
  Each tick whose registry data version differs from the last one it recorded also reports an
  observation of the ``surrogate_registry`` source asset (same data version and metadata as an
  Observe click), so the asset's version follows the registry without a manual observation.
  Each entry is checked on its own before it gets a partition (``load_registry_entries``): a
  malformed entry, a missing weights folder or weights whose sha256 is not the entry's are skipped
  with a warning (``context.log.warning`` on every tick, and listed in the tick's skip text), and
  the file's other entries are still screened.

Bad input becomes a ``SkipReason`` naming it: an unreadable results folder (``OSError``), a
registry file that cannot be read or parsed as a whole (``OSError``, ``ValueError`` - which covers
JSON errors and ``SurrogateError`` - and YAML errors). Anything else is a bug and fails the tick visibly.
"""

import json
import time
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from assets.partitions import DEFAULT_CHEMICAL_SYSTEM, chemical_system_partitions, surrogate_partitions
from assets.registry import registry_observation
from lib.dft_ingest import content_sha256, scan_results_root
from lib.ids import content_hash
from lib.surrogates.registry import load_registry_entries
from orchestration.jobs import CHURN_JOB, DFT_INGEST_JOB, RESCREEN_JOB, merge_run_config
from orchestration.profiles import DEFAULT_PROFILE
from orchestration.resources import CgwganHome, DftResource, SurrogateRegistryResource
from orchestration.schedules import rescreen_run_config as recorded_run_config

#: The tag an observation carries its data version in (Dagster's, as an observable source asset's ObserveResult sets it).
DATA_VERSION_TAG = "dagster/data_version"
#: What reading a registry file raises on bad content (JSON errors and SurrogateError are ValueErrors).
REGISTRY_INPUT_ERRORS = (OSError, ValueError, yaml.YAMLError)


# --------------------------------------------------------------------------- DFT results
def _ingested(store) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(run name, folder signature) and (run name, content sha256) of every ingested result."""
    sigs, contents = set(), set()
    for part in store.partitions("dft_results"):
        md = (store.pointer("dft_results", part) or {}).get("metadata", {})
        if md.get("run_name"):
            sigs.add((md["run_name"], md.get("signature", "")))
            contents.add((md["run_name"], md.get("content_sha256", "")))
    return sigs, contents


def dft_ingest_request(cgwgan_home: CgwganHome, cursor: str | None, *, settle_seconds: float,
                       retry_seconds: float = 1800.0, dft: DftResource | None = None,
                       now: float | None = None) -> tuple[dg.RunRequest | None, str, str]:
    """(run request or None, new cursor, a line saying what was seen).

    The cursor maps each folder to ``[signature, requested_at, confirmed]``. A folder is requested
    when its signature is new; a request not confirmed in the store after ``retry_seconds`` (its
    run failed or never ran) is made again, so no finished folder is lost.
    """
    now = time.time() if now is None else now
    root = (dft or DftResource()).results_root(cgwgan_home)
    raw = json.loads(cursor) if cursor else {}
    seen = {k: (v if isinstance(v, list) else [v, 0.0, False]) for k, v in raw.items()}
    folders = scan_results_root(root, settle_seconds=settle_seconds)
    pending, retried = [], []
    ingested = None
    for f in folders:
        if not (f.is_ready or f.refused_reason):
            continue
        prev = seen.get(f.name)
        if prev is None or prev[0] != f.signature:
            pending.append(f)
            continue
        if prev[2] or now - prev[1] < retry_seconds:
            continue
        if ingested is None:
            ingested = _ingested(cgwgan_home.store)
        done = (f.name, f.signature) in ingested[0]
        if not done and not f.refused_reason:
            done = (f.name, content_sha256(f.path)[0]) in ingested[1]
        if done:
            prev[2] = True
        else:
            retried.append(f)
    waiting = [f.name for f in folders if not f.is_ready and not f.refused_reason]
    names_now = {f.name for f in folders}
    new_cursor = {k: v for k, v in seen.items() if k in names_now}
    for f in [*pending, *retried]:
        new_cursor[f.name] = [f.signature, now, False]
    line = (f"{len(folders)} folders under {root}: {len(pending)} new to ingest, {len(retried)} retried, "
            f"{len(waiting)} not ready")
    todo = sorted([*pending, *retried], key=lambda f: f.name)
    if not todo:
        return None, json.dumps(new_cursor, sort_keys=True), line
    key = sorted((f.name, f.signature) for f in todo)
    request = dg.RunRequest(
        run_key="dft:" + content_hash([key, int(now) if retried else 0]),
        run_config={"ops": {"dft_results": {"config": {
            "results_dir": str(root), "run_names": [f.name for f in todo],
            "signatures": [f.signature for f in todo]}}}},
        tags={"cgwgan/trigger": "dft_results_sensor", "cgwgan/n_runs": str(len(todo))},
    )
    return request, json.dumps(new_cursor, sort_keys=True), line


def make_dft_results_sensor(*, name: str = "dft_results_sensor", settle_seconds: float = 60.0,
                            retry_seconds: float = 1800.0, minimum_interval_seconds: int = 30,
                            default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING):
    @dg.sensor(name=name, job=DFT_INGEST_JOB, minimum_interval_seconds=minimum_interval_seconds,
               default_status=default_status,
               description="Ingest finished VASP/phonopy run folders from the DFT results folder.")
    def _sensor(context: dg.SensorEvaluationContext, cgwgan_home: CgwganHome, dft: DftResource):
        try:
            request, cursor, line = dft_ingest_request(cgwgan_home, context.cursor, settle_seconds=settle_seconds,
                                                       retry_seconds=retry_seconds, dft=dft)
        except OSError as exc:  # bad input: the results folder cannot be read
            return dg.SkipReason(f"results folder unreadable: {type(exc).__name__}: {exc}")
        context.log.info(line)
        if request is None:
            return dg.SensorResult(skip_reason=dg.SkipReason(line), cursor=cursor)
        return dg.SensorResult(run_requests=[request], cursor=cursor)

    return _sensor


# --------------------------------------------------------------------------- surrogate registry
def _shortlist_state(cgwgan_home: CgwganHome) -> dict[str, dict[str, str]]:
    """chemical system -> {surrogate: current store version of its shortlist partition}."""
    store = cgwgan_home.store
    out: dict[str, dict[str, str]] = {}
    for part in store.partitions("shortlist"):
        cs, _, sur = part.partition("|")
        ptr = store.pointer("shortlist", part) or {}
        out.setdefault(cs, {})[sur] = str(ptr.get("version", ""))
    return out


def registry_requests(
    instance: dg.DagsterInstance,
    cgwgan_home: CgwganHome,
    surrogate_registry: SurrogateRegistryResource,
    cursor: str | None,
    *,
    default_chemical_system: str = DEFAULT_CHEMICAL_SYSTEM,
    rescreen_run_config: dict | None = None,
    rescreen_profile: str = DEFAULT_PROFILE,
    log: Any = None,
) -> dg.SensorResult:
    """What the registry sensor does on one tick (a function so it can be called from tests/CLI).

    A re-screening run gets the sizes the system was first screened with, or ``rescreen_profile``'s
    when it has none (:func:`orchestration.schedules.rescreen_run_config`), with
    ``rescreen_run_config`` merged over them.

    Registry entries that are malformed, lack their weights here or whose weights' sha256 does not
    match are skipped; each is passed to ``log.warning`` (when ``log`` is given) and named in the
    skip text of a tick that requests nothing."""
    state = json.loads(cursor) if cursor else {}
    screened: dict[str, str] = state.get("screened", {})
    churned: dict[str, str] = state.get("churn", {})
    observed = _registry_observation_event(surrogate_registry, state)
    registry_path = surrogate_registry.resolved_registry_path
    if not registry_path:
        return dg.SensorResult(skip_reason=dg.SkipReason(
            "no surrogate registry file configured (CGWGAN_SURROGATES): nothing registered to screen"),
            cursor=json.dumps(state, sort_keys=True), asset_events=observed)
    try:
        active, problems = load_registry_entries(registry_path,
                                                 models_dir=surrogate_registry.resolved_models_dir or None)
    except REGISTRY_INPUT_ERRORS as exc:  # bad input: the registry file cannot be read or parsed
        return dg.SensorResult(skip_reason=dg.SkipReason(
            f"surrogate registry {Path(registry_path).expanduser()} unreadable: {type(exc).__name__}: {exc}"),
            cursor=json.dumps(state, sort_keys=True))
    if log is not None:
        for problem in problems:
            log.warning(f"surrogate registry entry skipped: {problem}")
    known_surrogates = set(instance.get_dynamic_partitions("surrogate"))
    known_systems = set(instance.get_dynamic_partitions("chemical_system"))
    systems = sorted(known_systems | {default_chemical_system})
    shortlists = _shortlist_state(cgwgan_home)

    screenable = [cs for cs in systems if cgwgan_home.store.exists("candidates_dedup", cs)]
    runs: list[dg.RunRequest] = []
    sizes: dict[str, tuple[dict, str]] = {}
    for name, spec in sorted(active.items()):
        for cs in screenable:
            key = f"{cs}|{name}"
            if screened.get(key) == spec.sha256:
                continue
            if key not in screened and name in known_surrogates and name in shortlists.get(cs, {}):
                screened[key] = spec.sha256  # screened before this sensor kept track of it
                continue
            if cs not in sizes:  # the sizes the system was first screened with (before this tick's runs)
                sizes[cs] = recorded_run_config(cgwgan_home.store, cs, profile=rescreen_profile)
            base, source = sizes[cs]
            runs.append(dg.RunRequest(
                run_key=f"rescreen:{key}|{spec.sha256[:16]}",
                job_name=RESCREEN_JOB.name,
                run_config=merge_run_config(base, rescreen_run_config or {}),
                partition_key=dg.MultiPartitionKey({"chemical_system": cs, "surrogate": name}),
                tags={"cgwgan/trigger": "surrogate_registry_sensor", "cgwgan/surrogate": name,
                      "cgwgan/surrogate_sha256": spec.sha256, "cgwgan/sizes_from": source},
            ))
            screened[key] = spec.sha256

    churn_sigs = {cs: content_hash(sorted(v.items())) for cs, v in shortlists.items() if len(v) >= 2}
    changed = {cs: s for cs, s in churn_sigs.items() if churned.get(cs) != s}
    if changed:
        runs.append(dg.RunRequest(
            run_key="churn:" + content_hash(sorted(churn_sigs.items())), job_name=CHURN_JOB.name,
            tags={"cgwgan/trigger": "surrogate_registry_sensor",
                  "cgwgan/chemical_systems": ",".join(sorted(changed))}))
        churned.update(changed)

    partition_requests = []
    add_surrogates = sorted(set(active) - known_surrogates)
    if add_surrogates:
        partition_requests.append(surrogate_partitions.build_add_request(add_surrogates))
    add_systems = sorted({default_chemical_system} - known_systems)
    if add_systems:
        partition_requests.append(chemical_system_partitions.build_add_request(add_systems))
    new_state = json.dumps({"screened": screened, "churn": churned,
                            **({"registry_version": state["registry_version"]} if "registry_version" in state else {})},
                           sort_keys=True)
    if not runs and not partition_requests:
        note = f"{len(active)} registered surrogates, nothing new"
        waiting = sorted(set(systems) - set(screenable))
        if waiting:
            note += f"; no candidates_dedup yet for {', '.join(waiting)}"
        if problems:
            note += f"; {len(problems)} entries skipped: " + "; ".join(problems)
        return dg.SensorResult(skip_reason=dg.SkipReason(note), cursor=new_state, asset_events=observed)
    return dg.SensorResult(run_requests=runs, dynamic_partitions_requests=partition_requests, cursor=new_state,
                           asset_events=observed)


def _registry_observation_event(surrogate_registry: SurrogateRegistryResource,
                                state: dict[str, Any]) -> list[dg.AssetObservation]:
    """An observation of ``surrogate_registry`` when its data version differs from the one in
    ``state`` (the cursor; updated in place), else none. A registry that cannot be read is not
    observed (the tick's skip reason says why)."""
    try:
        version, metadata = registry_observation(surrogate_registry)
    except REGISTRY_INPUT_ERRORS:
        return []
    if state.get("registry_version") == version:
        return []
    state["registry_version"] = version
    return [dg.AssetObservation(asset_key="surrogate_registry", metadata=metadata,
                                tags={DATA_VERSION_TAG: version})]


def make_surrogate_registry_sensor(*, name: str = "surrogate_registry_sensor", minimum_interval_seconds: int = 60,
                                   default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
                                   default_chemical_system: str = DEFAULT_CHEMICAL_SYSTEM,
                                   rescreen_run_config: dict | None = None,
                                   rescreen_profile: str = DEFAULT_PROFILE):
    """The registry sensor; each re-screening run gets the sizes its system was first screened
    with (else ``rescreen_profile``'s), with ``rescreen_run_config`` merged over them."""

    @dg.sensor(name=name, jobs=[RESCREEN_JOB, CHURN_JOB], minimum_interval_seconds=minimum_interval_seconds,
               default_status=default_status,
               description="New surrogate in the registry → add its partitions, re-screen, then report churn.")
    def _sensor(context: dg.SensorEvaluationContext, surrogate_registry: SurrogateRegistryResource,
                cgwgan_home: CgwganHome):
        return registry_requests(context.instance, cgwgan_home, surrogate_registry, context.cursor,
                                 default_chemical_system=default_chemical_system,
                                 rescreen_run_config=rescreen_run_config, rescreen_profile=rescreen_profile,
                                 log=context.log)

    return _sensor


dft_results_sensor = make_dft_results_sensor()
surrogate_registry_sensor = make_surrogate_registry_sensor()

SENSORS: list = [dft_results_sensor, surrogate_registry_sensor]
