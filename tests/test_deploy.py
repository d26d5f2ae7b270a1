"""deploy/: the container image and the Kubernetes manifests, checked without Docker or a cluster.

- ``hadolint`` lints deploy/Dockerfile and ``kubernetes-validate --strict`` checks every manifest
  against the API schemas it bundles (offline), for the oldest Kubernetes the manifests need
  (1.33: ``backoffLimitPerIndex``) and a newer one. Both come with the dev dependencies.
- What a schema cannot see: the pieces agree with each other (secret, volume, study name, user).
- The containers' commands are the ones that work: scripts/k8s_local.sh reads the Jobs' command
  and args from the manifests and runs them as local processes (the driver and two workers)
  against a local study, or the CI's password-protected PostgreSQL; the test checks what ran,
  exactly, against the manifests, and that the storage URL reached no process argument and its
  password no file.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
# The oldest Kubernetes the manifests need (backoffLimitPerIndex is GA from 1.33), and a newer one.
K8S_VERSIONS = ["1.33.0", "1.37.0"]
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def tool(name: str) -> str:
    """The dev dependency's binary: beside this interpreter (its bin dir), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(
            f'{name} is not installed; install the dev dependencies: pip install -e ".[dev]"'
        )
    return found


def docs() -> list[dict]:
    return [d for f in MANIFESTS for d in yaml.safe_load_all(f.read_text()) if d]


def job(name: str) -> dict:
    (found,) = [d for d in docs() if d["kind"] == "Job" and d["metadata"]["name"] == name]
    return found


def container(name: str) -> dict:
    (c,) = job(name)["spec"]["template"]["spec"]["containers"]
    return c


def part_of(d: dict) -> str | None:
    return d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of")


def pod_specs(part: str = "engine-sweep") -> list[dict]:
    """The pod specs of one application's workloads (the sweep's, or the server's)."""
    return [
        d["spec"]["template"]["spec"]
        for d in docs()
        if "template" in d.get("spec", {}) and part_of(d) == part
    ]


# ---- the linters ----------------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint():
    result = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "style", "deploy/Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Any rule switched off is switched off on its line, with the reason after it.
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if "hadolint ignore" in line:
            assert re.search(r"hadolint ignore=\S+\s+\S", line), (
                f"an ignore without a reason: {line}"
            )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_passes_kubernetes_validate_strict(version):
    assert MANIFESTS, "no manifest under deploy/k8s/"
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", version, *map(str, MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert out.count(" passed for resource ") == len(docs()), out


def test_kubernetes_validate_strict_refuses_a_misspelt_field(tmp_path):
    """The validation really runs (here, offline): a typo in a Job's spec is refused."""
    bad = tmp_path / "bad.yaml"
    text = (DEPLOY / "k8s" / "20-workers-job.yaml").read_text()
    bad.write_text(text.replace("completionMode:", "completionMod:"))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", K8S_VERSIONS[0], str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "completionMod" in result.stdout + result.stderr


# ---- what the schemas cannot see ------------------------------------------------------------


def test_the_storage_url_comes_from_a_secret_and_is_committed_nowhere():
    assert not [d for d in docs() if d["kind"] == "Secret"], "a Secret is committed"
    for f in [*MANIFESTS, DEPLOY / "Dockerfile"]:
        assert not re.search(r"postgres(ql)?(\+\w+)?://", f.read_text()), f
    for name in ("engine-study", "engine-workers"):
        c = container(name)
        (entry,) = [e for e in c["env"] if e["name"] == "ENGINE_SEARCH_STORAGE"]
        assert entry["valueFrom"]["secretKeyRef"] == {"name": "engine-study-db", "key": "url"}
        words = c["command"] + c["args"]
        # $(VAR) would put the secret into the process's arguments, readable by all in ps.
        assert not [w for w in words if "$(ENGINE_SEARCH_STORAGE)" in w]
    assert "search.storage=${oc.env:ENGINE_SEARCH_STORAGE}" in container("engine-study")["args"]
    assert "--storage" not in container("engine-workers")["args"]


def test_the_study_job_and_the_workers_agree():
    driver, workers = container("engine-study"), container("engine-workers")
    args = dict(a.split("=", 1) for a in driver["args"] if "=" in a)
    assert driver["command"] == ["python", "-m", "engine.train"] and driver["args"][0] == "-m"
    assert args["search.launch"] == "external"
    assert workers["command"] == ["python", "-m", "engine.search.worker"]
    w = workers["args"]
    assert w[w.index("--study") + 1] == args["search.study_name"]
    assert float(w[w.index("--wait-for-study") + 1]) > 0
    # Every pod mounts the one shared claim where the driver's sweep dir is.
    claims = {
        d["metadata"]["name"]: d
        for d in docs()
        if d["kind"] == "PersistentVolumeClaim" and part_of(d) == "engine-sweep"
    }
    assert [c["spec"]["accessModes"] for c in claims.values()] == [["ReadWriteMany"]]
    for spec in pod_specs():
        (volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"]["claimName"] in claims
        (c,) = spec["containers"]
        (mount,) = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == volume["name"]]
        assert mount == "/sweeps"
        assert c["image"] == driver["image"]
    assert args["hydra.sweep.dir"].startswith("/sweeps/")


def test_the_workers_are_an_indexed_job_with_per_index_retries():
    spec = job("engine-workers")["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 2
    c = container("engine-workers")
    (index,) = [e for e in c["env"] if e.get("valueFrom", {}).get("fieldRef")]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == INDEX_ANNOTATION
    w = c["args"]
    assert w[w.index("--worker") + 1] == f"$({index['name']})"
    assert "limits" in c["resources"] and "requests" in c["resources"]
    text = (DEPLOY / "k8s" / "20-workers-job.yaml").read_text()
    assert re.search(r"#\s*nvidia\.com/gpu:\s*1", text), "the commented GPU line is gone"
    actions = {r["action"] for r in spec["podFailurePolicy"]["rules"]}
    if "FailIndex" in actions:
        assert "backoffLimitPerIndex" in spec  # the API refuses FailIndex without it
    # The worker's exit code after handing its trial back (SIGTERM) is not counted as a failure.
    from engine.search.worker import EXIT_PREEMPTED

    ignored = [
        r["onExitCodes"]["values"]
        for r in spec["podFailurePolicy"]["rules"]
        if r["action"] == "Ignore" and "onExitCodes" in r
    ]
    assert [EXIT_PREEMPTED] in ignored


def test_every_pod_runs_as_the_images_non_root_user():
    (user,) = re.findall(r"^USER\s+(\d+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    for d in docs():
        spec = d.get("spec", {})
        if "template" not in spec:
            continue
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert str(pod["securityContext"]["runAsUser"]) == user
        (c,) = pod["containers"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["resources"]["limits"]["memory"]
        if d["kind"] == "Job":  # a podFailurePolicy needs restartPolicy Never
            assert pod["restartPolicy"] == "Never"
        assert set(spec["template"]["metadata"]["labels"]) >= {"app.kubernetes.io/name"}


def test_the_image_copies_what_exists_and_the_dockerignore_lets_it_through():
    text = (DEPLOY / "Dockerfile").read_text()
    sources = [s for line in re.findall(r"^COPY\s+(.+)$", text, re.M) for s in line.split()[:-1]]
    assert sources
    for s in sources:
        assert (REPO / s).exists(), s
    # deploy/Dockerfile.dockerignore: everything out, then these back in.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore and set(sources) <= allowed


def test_the_readme_names_files_and_objects_that_exist():
    readme = (DEPLOY / "README.md").read_text()
    for path in re.findall(r"\b((?:deploy|scripts)/[\w./-]+\w)", readme):
        assert (REPO / path).exists(), path
    names = {d["metadata"]["name"] for d in docs()}
    for name in re.findall(r"\b(?:job|deployment|pvc)/([\w-]+)", readme):
        assert name in names, name
    assert "kubectl create secret generic engine-study-db --from-file=url=" in readme


# ---- the manifests' commands, run -----------------------------------------------------------


class Session:
    """Every process of one session (the script's): its argv as ``ps`` shows it to any user."""

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.argv: dict[int, list[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    stat = (entry / "stat").read_text()
                    # field 6, after the parenthesised name (which may hold spaces)
                    if int(stat.rsplit(")", 1)[1].split()[3]) != self.sid:
                        continue
                    raw = (entry / "cmdline").read_bytes()
                except (OSError, ValueError, IndexError):
                    continue
                if raw:  # the last read wins: after an exec a pid shows its new program
                    self.argv[int(entry.name)] = raw.rstrip(b"\0").decode().split("\0")
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def expected_argv(name: str, *, sweeps: Path, study: str, index: int = 0, extra=()) -> list[str]:
    """The container's command and args with what k8s_local.sh substitutes, done here again."""
    c = container(name)
    old = next(
        a.split("=", 1)[1]
        for a in container("engine-study")["args"]
        if a.startswith("search.study_name=")
    )
    words = [sys.executable] + c["command"][1:]
    for i, a in enumerate(c["args"]):
        a = a.replace("$(WORKER_INDEX)", str(index)).replace("/sweeps/", f"{sweeps}/")
        if a == f"search.study_name={old}" or (a == old and c["args"][i - 1] == "--study"):
            a = a.replace(old, study)
        words.append(a)
    for override in extra:
        key = override.split("=", 1)[0]
        same = [i for i, w in enumerate(words) if w.split("=", 1)[0] == key]
        if same:
            words[same[0]] = override
        else:
            words.append(override)
    return words


@pytest.mark.slow
def test_the_manifests_commands_run_a_sweep_as_local_processes(tmp_path):
    """The driver of the Job engine-study and two workers of the Indexed Job engine-workers,
    run by scripts/k8s_local.sh with the manifests' own command and args, finish a 3-trial
    study exactly; the storage comes through the environment only. With the CI's password
    PostgreSQL (``ENGINE_TEST_POSTGRES_SECRET_URL``) the study lives there, else in a journal."""
    token = uuid.uuid4().hex[:12]
    url = os.environ.get("ENGINE_TEST_POSTGRES_SECRET_URL")
    password = url.split("://", 1)[1].split("@", 1)[0].partition(":")[2] if url else None
    # Without a database, a journal whose path carries a marker to look for in the arguments.
    marker = f"secret{uuid.uuid4().hex[:12]}"
    storage = url or str(tmp_path / marker / "study.journal")
    secret = password or marker
    study = f"k8s-test-{token}"
    sweeps = tmp_path / "sweeps"
    overrides = [
        "search.n_trials=3",
        "trainer.max_epochs=1",
        "model=linear",
        "data.batch_size=256",
        "trainer.progress=none",
    ]
    env = dict(
        os.environ,
        ENGINE_SEARCH_STORAGE=storage,
        K8S_LOCAL_STUDY=study,
        K8S_LOCAL_WORKERS="2",
        PYTHON=sys.executable,
        PYTHONUNBUFFERED="1",
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "k8s_local.sh"), str(sweeps), *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own session: the watcher follows it, a timeout kills it all
    )
    session = Session(proc.pid)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"scripts/k8s_local.sh did not finish in 300 s:\n{out}")
    finally:
        session.stop()
    seconds = time.monotonic() - started
    assert proc.returncode == 0, out

    (target,) = [a for a in container("engine-study")["args"] if a.startswith("hydra.sweep.dir=")]
    sweep_dir = sweeps / target.split("=", 1)[1].removeprefix("/sweeps/")
    with (sweep_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["number"]) for r in rows) == [0, 1, 2], out
    assert [r["state"] for r in rows] == ["complete"] * 3, out
    assert (sweep_dir / "best.yaml").exists() and (sweep_dir / "study").is_dir()
    assert len(list(sweep_dir.glob("trial_*/metrics.json"))) == 3

    # What ran is the manifests' commands, word for word, with only the substitutions.
    ran = list(session.argv.values())
    workers = [a for a in ran if a[1:3] == ["-m", "engine.search.worker"]]
    drivers = [a for a in ran if a[1:3] == ["-m", "engine.train"]]
    want_driver = expected_argv("engine-study", sweeps=sweeps, study=study, extra=overrides)
    assert drivers == [want_driver]
    assert sorted(workers) == sorted(
        expected_argv("engine-workers", sweeps=sweeps, study=study, index=i) for i in range(2)
    )
    assert "search.storage=${oc.env:ENGINE_SEARCH_STORAGE}" in want_driver  # unresolved
    assert [a for a in ran if any(secret in w for w in a)] == []
    if password:  # (a journal's path is no secret: the console shows it)
        assert password not in out
        assert ":***@" in out  # the driver shows the URL, masked
        holding = [
            p for p in tmp_path.rglob("*") if p.is_file() and password.encode() in p.read_bytes()
        ]
        assert holding == []
        import optuna

        from engine.search.storage import open_storage

        optuna.delete_study(study_name=study, storage=open_storage(url))
    print(
        f"k8s_local.sh: 3 trials, 2 workers, {seconds:.1f} s ({'postgresql' if url else 'journal'})"
    )


# ---- serving (deploy/k8s/40-serve.yaml) -----------------------------------------------------


def _serve_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in docs() if part_of(d) == "engine-serve"}


def _server() -> dict:
    (c,) = _serve_docs()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def _port_number(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return number


def test_the_server_deployment_probes_the_v2_health_endpoints_on_its_port():
    c = _server()
    args = dict(a.split("=", 1) for a in c["args"])
    assert c["command"] == ["python", "-m", "engine.serve"]
    assert args["serve.host"] == "0.0.0.0"  # the server binds 127.0.0.1 unless told
    probes = {
        kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert probes["startupProbe"]["path"].startswith("/v2/health/")
    for probe in probes.values():
        assert _port_number(c, probe["port"]) == int(args["serve.port"])
    # SIGTERM drains: the pod's grace period outlasts the preStop pause and the server's drain.
    pod = _serve_docs()["Deployment"]["spec"]["template"]["spec"]
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause + float(args["serve.shutdown_timeout_s"])


def test_the_server_takes_its_token_and_database_from_secrets_and_reads_the_store_read_only():
    c = _server()
    env = {e["name"]: e for e in c["env"]}
    assert env["ENGINE_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "engine-serve-token",
        "key": "token",
    }
    assert env["ENGINE_REGISTRY_STORAGE"]["valueFrom"]["secretKeyRef"] == {
        "name": "engine-registry-db",
        "key": "url",
    }
    assert not [a for a in c["args"] if "token" in a or "storage" in a or "$(" in a]
    assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    (mount,) = [
        m for m in c["volumeMounts"] if m["mountPath"] == env["ENGINE_REGISTRY_STORE"]["value"]
    ]
    assert mount["readOnly"] is True
    pod = _serve_docs()["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert (
        volume["persistentVolumeClaim"]["claimName"]
        == _serve_docs()["PersistentVolumeClaim"]["metadata"]["name"]
    )
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_the_service_and_the_autoscaler_point_at_the_server():
    serve = _serve_docs()
    deployment, service, hpa = (
        serve["Deployment"],
        serve["Service"],
        serve["HorizontalPodAutoscaler"],
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("http", 80, "http")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] == 2
    assert hpa["spec"]["maxReplicas"] == 10
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    assert "requests" in _server()["resources"]  # CPU utilisation is relative to requests.cpu


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_server_deployments_command_runs_and_answers_its_probes(tmp_path):
    """The Deployment engine-serve's container command, args and env, run as a local process
    against a tiny registry in tmp_path. Substituted, and only these: ``serve.host=0.0.0.0``
    becomes ``serve.host=127.0.0.1`` (tests listen on the loopback only), ``serve.port`` a free
    port (the probes' port is checked against the manifest's instead), ``serve.log_dir`` a
    folder in tmp_path; the Secrets' values are the test's token and registry database, and
    ENGINE_REGISTRY_STORE (the volume's mount path) the test's store."""
    import json
    import urllib.error
    import urllib.request

    c = _server()
    args = dict(a.split("=", 1) for a in c["args"])
    model = args["model"]
    name, alias = model.split("@")
    run, db, store = tmp_path / "run", tmp_path / "registry.db", tmp_path / "registry"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    fast = ["trainer.progress=none", "trainer.num_threads=1", "trainer.max_epochs=1"]
    for argv in (
        ["engine.train", *fast, "model=linear", f"hydra.run.dir={run}"],
        [
            "engine.registry",
            "register",
            str(run),
            "--name",
            name,
            "--storage",
            str(db),
            "--store",
            str(store),
        ],
        ["engine.registry", "promote", f"{name}@1", "--alias", alias, "--storage", str(db)],
    ):
        done = subprocess.run(
            [sys.executable, "-m", *argv],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr

    port = _free_port()
    substitute = {
        "serve.host": "127.0.0.1",
        "serve.port": str(port),
        "serve.log_dir": str(tmp_path / "serve"),
    }
    words = [sys.executable] + c["command"][1:]
    for a in c["args"]:
        key = a.split("=", 1)[0]
        words.append(f"{key}={substitute[key]}" if key in substitute else a)
    token = uuid.uuid4().hex
    secrets = {
        ("engine-serve-token", "token"): token,
        ("engine-registry-db", "url"): str(db),
    }
    limits = c["resources"]["limits"]
    server_env = dict(os.environ, PYTHONUNBUFFERED="1")
    for e in c["env"]:
        if "value" in e:
            server_env[e["name"]] = (
                str(store) if e["name"] == "ENGINE_REGISTRY_STORE" else e["value"]
            )
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            server_env[e["name"]] = secrets[(ref["name"], ref["key"])]
        else:
            field = e["valueFrom"]["resourceFieldRef"]["resource"]
            server_env[e["name"]] = str(limits[field.split(".", 1)[1]])
    assert token not in " ".join(words)

    proc = subprocess.Popen(
        words,
        cwd=tmp_path,
        env=server_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def get(path: str, auth: bool = False) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if auth:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if get("/v2/health/ready") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "the server did not get ready in 120 s"
            time.sleep(0.3)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert get(c[kind]["httpGet"]["path"]) == 200, kind
        # /metrics wants the token (say so to the scrape job); with it, Prometheus text.
        assert get("/metrics") == 401
        assert get("/metrics", auth=True) == 200
        assert json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=5).read()
        ) == {"live": True}
    finally:
        proc.send_signal(signal.SIGTERM)  # what the kubelet sends: a graceful stop
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert token not in out
