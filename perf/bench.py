"""Serving benchmark of one exported run, written to perf/results/ (docs/performance.md explains method and numbers).

    .venv/bin/python perf/bench.py --run runs/demo            # the full bench (~35 min on 2 cores)
    .venv/bin/python perf/bench.py --run runs/demo --quick    # CI smoke: tiny windows, few points (< 4 min)

Systems, each pinned to the server's core(s) while perf_analyzer runs on the client's (perf/machine.py):
the tuned ensemble (the exported repository as shipped, CPU configs), the ranker model alone behind the same Triton
(the bare ranker), the untuned ensemble (no dynamic batching, one instance per model), and the naive FastAPI +
PyTorch eager service (perf/naive_service.py) behind the same KServe v2 HTTP protocol. For each request set (the
fixed 1 x 100 request and requests drawn from the log) and p99 budget, a search over perf_analyzer load points
(load.pa_search) finds each system's highest throughput within the budget, repeated and interleaved (perf/measure.py); ratios come from
paired repeats with their range (perf/analysis.py). Also: 2x-saturation overload with and without a bounded queue,
de-duplication on the wire, the ranker in-process (FLOPs, roofline, rewrites), feature-store freshness (Redis),
py-spy profiles of the Python backend stubs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "perf"
for p in (ROOT, PERF, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import make_inputs  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402
from features import load_store, preprocessor  # noqa: E402
from freshness import freshness  # noqa: E402
from load import pa_point  # noqa: E402
from machine import CoreSplit, machine_description  # noqa: E402
from plots import plots  # noqa: E402
from profiling import profile_stubs  # noqa: E402
from settings import Settings, log  # noqa: E402
from seqrank.exporting import is_current_export, triton_config  # noqa: E402
from systems import NaiveService, TritonSystem, served_config, triton_version, untuned_copy  # noqa: E402
from wire import wire_bytes  # noqa: E402

INPUT_COPIES = ("manifest.json", "fixed_1x100_store.json", "fixed_1x16_store.json", "log_store.json")


def fresh_outdir(out: Path) -> Path:
    """``out`` without an earlier run's results (a run that fails leaves nothing looking current); its logs/."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.png"), *out.glob("csv/*.csv"),
                *(out / n for n in ("summary.json", "points.json", "profile.json", "report.md"))]:
        old.unlink(missing_ok=True)
    shutil.rmtree(out / "logs", ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    return out / "logs"


def parity(tuned_url: str, naive_url: str, req: dict) -> dict:
    """The fixed request through the ensemble and the naive service (the same HTTP client): every candidate's
    utility must agree (ONNX Runtime vs torch eager), or the comparison is not of the same model."""
    import tritonclient.http as http

    from seqrank.client import build_inputs
    answers = {}
    for name, url in (("ensemble", tuned_url), ("naive", naive_url)):
        with http.InferenceServerClient(url) as client:
            r = client.infer("seqrank", build_inputs(http, req["user_id"], req["candidate_ids"],
                                                     request_time=req["request_time_ms"]),
                             outputs=[http.InferRequestedOutput(n, binary_data=True)
                                      for n in ("ranked_ids", "utility", "sequence_source")])
        ids = [x.decode() for x in r.as_numpy("ranked_ids").reshape(-1)]
        answers[name] = (dict(zip(ids, r.as_numpy("utility").reshape(-1).tolist())), ids,
                         r.as_numpy("sequence_source").reshape(-1)[0].decode())
    (eu, eids, esrc), (nu, nids, nsrc) = answers["ensemble"], answers["naive"]
    return {"max_abs_utility_diff": max(abs(eu[k] - nu[k]) for k in eu), "same_top10": eids[:10] == nids[:10],
            "ensemble_source": esrc, "naive_source": nsrc}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a trained, exported run directory")
    ap.add_argument("--repository", type=Path, help="default: <run>/model_repository")
    ap.add_argument("--out", type=Path, default=PERF / "results")
    ap.add_argument("--events", help="the action log (default: the run's)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny windows, few points (< 4 minutes)")
    ap.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)

    started = time.time()
    st = Settings.make(args.quick)
    run = args.run.resolve()
    repo = (args.repository or run / "model_repository").resolve()
    if not (repo / "ranker" / "1" / "model.onnx").is_file():
        ap.error(f"{repo} is not an exported model repository (run `seqrank export --run {args.run}`)")
    if not is_current_export(run, repo):  # an older template's model.py files or configs, or the run's old weights
        ap.error(f"{repo} was exported from another version of seqrank's model repository template, or before its "
                 f"run was trained again: export it again (`seqrank export --run {args.run}`, or `make demo` for the "
                 f"demo run)")
    out = args.out.resolve()
    logs = fresh_outdir(out)
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="seqrank-bench-"))
    (work / "pa").mkdir(parents=True, exist_ok=True)
    cores = CoreSplit.of_this_process()
    log(f"run {run}, repository {repo}, results {out}, scratch {work}, {'quick' if st.quick else 'full'}; "
        f"client cores {sorted(cores.client)}, server cores {sorted(cores.server)}")
    machine = machine_description()
    machine["pinning"] = cores.describe()
    running: list = []
    details: dict = {"stub_incidents": []}
    extra: dict = {}
    budgets: dict = {}
    try:
        event_log = make_inputs.load_event_log(run, args.events)
        ev, skip = event_log.events, [event_log.exposure_action]
        manifest = make_inputs.write_inputs(run, work / "inputs", args.events, st.n_requests, ev=ev)
        (out / "inputs").mkdir(exist_ok=True)
        for name in INPUT_COPIES:
            shutil.copy2(work / "inputs" / name, out / "inputs" / name)
        reqs = json.loads((work / "inputs" / "requests.json").read_text())
        store_url = f"sqlite:///{work / 'store.db'}"
        details["store"] = load_store(store_url, ev, run, skip)
        pre = preprocessor(repo, store_url)
        t100, t100_run, details["fixed_request"] = measure.fixed_request(pre, reqs, run)
        found, more = measure.in_process(run, repo, pre, reqs, t100, t100_run, work, st)
        details.update(found)
        extra.update(more)
        inputs = measure.budget_inputs(pre, reqs, manifest["files"], work, st.request_sets)

        incidents = details["stub_incidents"]
        tuned = TritonSystem("tuned", repo, store_url, logs, cores.server, incidents)
        running.append(tuned)
        machine["versions"]["tritonserver"] = triton_version(tuned.server())
        details["untuned_changes"] = untuned_copy(repo, work / "untuned_repository")
        untuned = TritonSystem("untuned", work / "untuned_repository", store_url, logs, cores.server, incidents)
        running.append(untuned)
        naive = NaiveService(run, repo, store_url, cores.server, logs / "naive.log")
        running.append(naive)
        naive.wait_ready()
        machine["pinning"]["checked"] = {name: s.pinning() for name, s in
                                         (("tuned", tuned), ("untuned", untuned), ("naive", naive))}
        details["parity"] = parity(tuned.http_url, naive.http_url, reqs["fixed_1x100"][0])
        log(f"parity {details['parity']}")
        if not details["parity"]["max_abs_utility_diff"] < 1e-4:
            raise RuntimeError(f"the ensemble and the naive service do not score alike: {details['parity']}")
        details["wire"] = wire_bytes(tuned.http_url, t100, details["fixed_request"]["scored_width"],
                                     triton_config.load(served_config(repo, "ranker")).max_batch_size)
        log(f"de-duplication on the wire: {details['wire']['ratio']:.1f}x")
        targets = {"tuned": tuned.http_url, "untuned": untuned.http_url, "naive": naive.http_url}
        for target in targets.values():  # warm every system on every input once
            for (rset, form), data in inputs.items():
                pa_point(target, "ranker" if form == "ranker" else "seqrank", data, work / "pa" / "warm.csv",
                         Settings(True, pa_window_ms=300), concurrency=1, cores=cores.client)
        budgets = measure.budget_searches(targets, inputs, st, cores.client, work / "pa", logs)
        for s in (untuned, naive):
            s.stop()
            running.remove(s)
        sat = pa_point(tuned.server().http_url, "seqrank", inputs[("fixed_1x100", "store")], work / "pa" / "sat.csv",
                       st, concurrency=4, cores=cores.client, logs=logs)
        details["p99_point"] = pa_point(tuned.http_url, "seqrank", inputs[("fixed_1x100", "store")],
                                        work / "pa" / "p99.csv", st, rate=max(0.2, 0.5 * sat.get("throughput", 0.4)),
                                        cores=cores.client, logs=logs, metrics_url=tuned.metrics_url)
        details["p99_point"]["saturation"] = {k: sat.get(k) for k in ("throughput", "p99_ms", "load")}
        details["overload"] = measure.overload(tuned, repo, store_url, reqs[st.overload_set],
                                               inputs[(st.overload_set, "store")], st, cores.client, cores.server,
                                               work, logs, incidents)
        for rset in st.request_sets:
            key = f"profile_{rset}"
            try:
                extra[key] = profile_stubs(tuned.server(), inputs[(rset, "store")], 4, st.profile_s, logs / key,
                                           cores.client)
                extra[key]["request"] = rset
            except Exception as e:  # noqa: BLE001
                extra[key] = {"error": repr(e)}
        tuned.stop()
        running.remove(tuned)
        log("freshness through the ensemble with Redis")
        try:
            from seqrank.exporting import load_ranker
            vocab = load_ranker(run)[2]
            items = [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(vocab.items).tolist()]
            details["freshness"] = freshness(repo, ev, run, reqs["fixed_1x16"][0], st.freshness_n, logs, items,
                                             list(vocab.actions), skip, cores.server)
        except Exception as e:  # noqa: BLE001
            details["freshness"] = {"error": repr(e), "traceback": traceback.format_exc()[-2000:]}
        log(f"freshness p99 {details['freshness'].get('p99_ms')} ms")
    finally:
        for s in running:
            s.stop()
    machine["loadavg_at_end"] = list(os.getloadavg())
    summary = report.summarize(details, budgets, st, machine, str(args.run),
                               time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), time.time() - started)
    extra["bounds_md"] = report.bounds_md(summary, extra)
    summary["csv_files"] = [str(Path(f).relative_to(out)) for f in report.write_csvs(budgets, out / "csv")]
    try:
        summary["plots"] = [str(Path(f).relative_to(out)) for f in plots(summary, out)]
    except Exception as e:  # noqa: BLE001
        summary["plots_error"] = repr(e)
    summary["wall_s"] = time.time() - started
    report.write(out, summary, manifest, extra, budgets)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    log("summary: " + json.dumps({k: summary[k] for k in report.SUMMARY_KEYS}))
    log(f"met: {json.dumps({k: v['met'] for k, v in summary['targets'].items()})}; {summary['wall_s']:.0f} s; "
        f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
