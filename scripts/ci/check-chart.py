#!/usr/bin/env python3
"""Checks charts/testflinger without a cluster.

Always (needs PyYAML):
  - Chart.yaml and values.yaml parse as YAML and have the keys the templates use, and
    agents get their own broker users by default (agentBroker);
  - every template has balanced `{{ }}` actions and balanced if/range/with/define ... end
    blocks, and no tab characters.
When Helm is available (a `helm` binary on PATH, or the `helm_python` module of the PyPI
package helm-python-sdk), also:
  - the chart renders with its default values and with a few variants, and every rendered
    manifest parses as YAML and has apiVersion, kind and metadata.name;
  - the rendered agent config files parse and name the keys the agent requires;
  - each agent with its own broker user reads its password from a Secret of its own, and
    two agents never share a Secret nor a password.
CHECK_CHART_RENDER=required makes a missing Helm an error instead of a skip.

Prints `N passed, N failed` and exits non-zero on any failure.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover
    print("check-chart: PyYAML is missing (pip install pyyaml, or apt-get install python3-yaml)")
    sys.exit(2)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "testflinger"

passed = 0
failed = 0


def ok(msg):
    global passed
    passed += 1
    print(f"ok - {msg}")


def not_ok(msg):
    global failed
    failed += 1
    print(f"not ok - {msg}")


def check(cond, msg, detail=""):
    if cond:
        ok(msg)
    else:
        not_ok(msg + (f": {detail}" if detail else ""))
    return cond


# ------------------------------------------------------------------ static checks

def load_yaml(path):
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except Exception as e:  # noqa: BLE001
        not_ok(f"{path.relative_to(REPO)} parses as YAML: {e}")
        return None


def static_checks():
    chart = load_yaml(CHART / "Chart.yaml")
    if chart is not None:
        missing = [k for k in ("apiVersion", "name", "version", "appVersion") if k not in chart]
        check(not missing and chart.get("apiVersion") == "v2" and chart.get("name") == "testflinger",
              "Chart.yaml parses and has apiVersion v2, name, version, appVersion", f"missing {missing}")
    values = load_yaml(CHART / "values.yaml")
    if values is not None:
        need = ["image", "amqp", "redis", "api", "ingress", "agentDefaults", "agents"]
        missing = [k for k in need if k not in values]
        check(not missing, "values.yaml parses and has " + ", ".join(need), f"missing {missing}")
        api = values.get("api", {})
        check(all(k in api for k in ("replicas", "resources", "livenessProbe", "readinessProbe")),
              "values.yaml: api has replicas, resources and probes")
        check(values.get("amqp", {}).get("existingSecret") and values.get("redis", {}).get("existingSecret"),
              "values.yaml: RabbitMQ and Redis URLs come from Secrets by default")
        ab = values.get("agentBroker") or {}
        check(ab.get("enabled") is True and all(ab.get(k) for k in ("scheme", "host", "port", "vhost")),
              "values.yaml: agentBroker on by default (each agent its own broker user), with "
              "scheme, host, port and vhost", str(ab))
        agents = values.get("agents") or []
        names = [a.get("name") for a in agents]
        check(agents and all(names) and len(set(names)) == len(names)
              and all(a.get("queues") for a in agents),
              "values.yaml: agents have unique names and queues")

    templates = sorted(p for p in (CHART / "templates").iterdir() if p.is_file())
    check(templates, "templates/ is not empty")
    for path in templates:
        text = path.read_text()
        rel = path.relative_to(REPO)
        problems = []
        if text.count("{{") != text.count("}}"):
            problems.append(f"{text.count('{{')} '{{{{' vs {text.count('}}')} '}}}}'")
        # Every action opens and closes on one line, except comments.
        stripped = re.sub(r"{{-?\s*/\*.*?\*/\s*-?}}", "", text, flags=re.S)
        for n, line in enumerate(stripped.splitlines(), 1):
            if line.count("{{") != line.count("}}"):
                problems.append(f"line {n}: action spans lines")
        depth = 0
        for m in re.finditer(r"{{-?\s*(if|range|with|define|block|end)\b", stripped):
            depth += 1 if m.group(1) != "end" else -1
            if depth < 0:
                problems.append("an {{ end }} without its block")
                break
        if depth > 0:
            problems.append(f"{depth} block(s) without {{{{ end }}}}")
        if "\t" in text:
            problems.append("tab characters")
        check(not problems, f"{rel}: balanced actions and blocks", "; ".join(problems))


# ------------------------------------------------------------------ rendering

def find_renderer():
    if shutil.which("helm"):
        return "helm"
    try:
        import helm_python  # noqa: F401
        return "helm_python"
    except Exception:  # noqa: BLE001
        return None


def render(renderer, values):
    """Returns {template path: manifest text}."""
    if renderer == "helm_python":
        import helm_python as helm
        chart = helm.Chart.load(str(CHART))
        return chart.render(values, name="tf", namespace="lab", is_install=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(values, f)
        vfile = f.name
    try:
        out = subprocess.run(
            ["helm", "template", "tf", str(CHART), "--namespace", "lab", "-f", vfile],
            check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(vfile)
    docs, current, name = {}, [], None
    for line in out.splitlines():
        m = re.match(r"# Source: (.*)", line)
        if m:
            if name:
                docs[name] = docs.get(name, "") + "\n---\n" + "\n".join(current)
            name, current = m.group(1), []
        else:
            current.append(line)
    if name:
        docs[name] = docs.get(name, "") + "\n---\n" + "\n".join(current)
    return docs


VARIANTS = {
    "default values": {},
    "ingress with TLS, no persistence, workers set, three agents": {
        "ingress": {"enabled": True, "className": "nginx",
                    "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "2g"},
                    "hosts": [{"host": "tf.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
                    "tls": [{"secretName": "tf-tls", "hosts": ["tf.example.com"]}]},
        "api": {"replicas": 2, "workers": 4, "persistence": {"enabled": False},
                "extraEnv": [{"name": "RUST_LOG", "value": "debug"}]},
        "agents": [
            {"name": "rpi-1", "queues": ["rpi4", "arm64"], "deviceType": "noprovision",
             "device": {"device_ip": "10.0.0.5", "test_username": "ubuntu",
                        "reboot_script": ["pdu off 3", "pdu on 3"]},
             "config": {"global_timeout": 7200, "setup_command": "echo setup"}},
            {"name": "fake-9", "queues": ["demo"], "resources": {"limits": {"memory": "256Mi"}}},
            {"name": "off-1", "queues": ["demo"], "enabled": False},
        ],
    },
    "authentication on, agents with token files and own broker users": {
        "auth": {"enabled": True, "existingSecret": "tf-auth"},
        "agents": [
            {"name": "lp-1", "queues": ["demo"], "tokenSecret": "lp-1-token",
             "amqpSecret": "lp-1-amqp"},
        ],
    },
    "a qemu agent with its own image, a key Secret and /dev/kvm": {
        "agents": [
            {"name": "qemu-1", "queues": ["qemu"], "deviceType": "qemu",
             "image": "registry.example.com/testflinger-qemu:1.0",
             "device": {"device_ip": "127.0.1.1", "ssh_port": 2201, "test_username": "ubuntu",
                        "ssh_identity_file": "/etc/testflinger-ssh/id_ed25519",
                        "qemu_image": "http://images.example.com/testflinger-test.qcow2"},
             "extraVolumes": [{"name": "ssh", "secret": {"secretName": "tf-qemu-ssh"}},
                              {"name": "kvm", "hostPath": {"path": "/dev/kvm", "type": "CharDevice"}}],
             "extraVolumeMounts": [{"name": "ssh", "mountPath": "/etc/testflinger-ssh", "readOnly": True},
                                   {"name": "kvm", "mountPath": "/dev/kvm"}]},
        ],
    },
    "own broker users: one password given, one generated, one whole URI, one disabled": {
        "agents": [
            {"name": "given-1", "queues": ["demo"], "brokerPassword": "given-pass-1"},
            {"name": "gen-2", "queues": ["demo"]},
            {"name": "uri-3", "queues": ["demo"], "amqpSecret": "uri-3-amqp"},
            {"name": "off-4", "queues": ["demo"], "enabled": False},
        ],
    },
    "agents on the shared broker Secret (agentBroker off)": {
        "agentBroker": {"enabled": False},
    },
    "existing claim, no service account": {
        "api": {"persistence": {"existingClaim": "tf-artifacts"}},
        "serviceAccount": {"create": False},
    },
}

AGENT_REQUIRED = ("agent_id", "server_address", "job_queues")


def merged_values(values):
    """values.yaml with `values` over it (deep for mappings), as Helm merges them."""
    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for k, v in over.items():
                out[k] = merge(base.get(k), v)
            return out
        return over
    with open(CHART / "values.yaml") as f:
        return merge(yaml.safe_load(f), values)


def agent_broker_checks(label, values, docs):
    """Each agent with its own broker user reads its password from its own Secret only;
    two agents share neither a Secret nor a password."""
    import base64
    v = merged_values(values)
    on = (v.get("agentBroker") or {}).get("enabled")
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    problems = []
    refs = {}  # agent -> broker Secret its Deployment reads
    for d in docs:
        if d["kind"] != "Deployment" or d["metadata"].get("labels", {}).get(
                "app.kubernetes.io/component") != "agent":
            continue
        agent = d["metadata"]["labels"].get("testflinger.io/agent")
        env = {e["name"]: e for e in d["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        spec = next(a for a in v["agents"] if a["name"] == agent)
        uri = env.get("AMQP_URI", {})
        if spec.get("amqpSecret"):
            if uri.get("valueFrom", {}).get("secretKeyRef", {}).get("name") != spec["amqpSecret"]:
                problems.append(f"{agent}: AMQP_URI is not from its amqpSecret")
            continue
        if not on:
            if uri.get("valueFrom", {}).get("secretKeyRef", {}).get("name") != v["amqp"]["existingSecret"]:
                problems.append(f"{agent}: AMQP_URI is not from the shared amqp Secret")
            continue
        ref = env.get("AGENT_BROKER_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if ref.get("key") != "password" or not ref.get("name"):
            problems.append(f"{agent}: no AGENT_BROKER_PASSWORD from a Secret's key password")
            continue
        refs[agent] = ref["name"]
        if f"agent-{agent}:$(AGENT_BROKER_PASSWORD)@" not in uri.get("value", ""):
            problems.append(f"{agent}: AMQP_URI {uri.get('value')!r} is not its own user with that password")
        secret = secrets.get(ref["name"])
        if secret is None:
            problems.append(f"{agent}: its Secret {ref['name']} is not rendered")
            continue
        if secret["metadata"].get("labels", {}).get("testflinger.io/agent") != agent:
            problems.append(f"{agent}: Secret {ref['name']} is labelled for another agent")
        data = secret.get("data") or {}
        password = base64.b64decode(data.get("password", "")).decode()
        if base64.b64decode(data.get("username", "")).decode() != f"agent-{agent}":
            problems.append(f"{agent}: Secret {ref['name']} username is not agent-{agent}")
        if spec.get("brokerPassword") and password != spec["brokerPassword"]:
            problems.append(f"{agent}: the given brokerPassword is not the Secret's")
        if not spec.get("brokerPassword") and len(password) < 32:
            problems.append(f"{agent}: a generated password of {len(password)} characters")
    if len(set(refs.values())) != len(refs):
        problems.append(f"two agents read the same broker Secret: {refs}")
    passwords = [secrets[n]["data"]["password"] for n in refs.values() if n in secrets]
    if len(set(passwords)) != len(passwords):
        problems.append("two agents' Secrets hold the same password")
    broker_secrets = [n for n, d in secrets.items() if n.endswith("-broker")]
    if sorted(broker_secrets) != sorted(refs.values()):
        problems.append(f"broker Secrets {broker_secrets} are not those the agents read {refs}")
    want = sum(1 for a in v["agents"] if str(a.get("enabled")) != "False" and on and not a.get("amqpSecret"))
    if len(refs) != want:
        problems.append(f"{len(refs)} agents with their own broker Secret, expected {want}")
    check(not problems, f"each agent's broker password in its own Secret, read by it only ({label})",
          "; ".join(problems))
    return refs


def render_checks(renderer):
    for label, values in VARIANTS.items():
        try:
            manifests = render(renderer, values)
        except Exception as e:  # noqa: BLE001
            not_ok(f"chart renders ({label}): {e}")
            continue
        ok(f"chart renders with {renderer} ({label}): {len(manifests)} templates")
        kinds = []
        problems = []
        all_docs = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                if "submit" not in text:
                    problems.append("NOTES.txt does not say how to submit a job")
                continue
            try:
                docs = [d for d in yaml.safe_load_all(text) if d is not None]
            except yaml.YAMLError as e:
                problems.append(f"{path} is not valid YAML: {e}")
                continue
            for d in docs:
                if not (isinstance(d, dict) and d.get("apiVersion") and d.get("kind")
                        and d.get("metadata", {}).get("name")):
                    problems.append(f"{path}: a document without apiVersion/kind/metadata.name")
                    continue
                kinds.append(d["kind"])
                all_docs.append(d)
                if d["kind"] == "ConfigMap" and "agent.yaml" in d.get("data", {}):
                    try:
                        agent = yaml.safe_load(d["data"]["agent.yaml"])
                        device = yaml.safe_load(d["data"]["device.yaml"])
                    except yaml.YAMLError as e:
                        problems.append(f"{path}: agent/device config is not YAML: {e}")
                        continue
                    miss = [k for k in AGENT_REQUIRED if not agent.get(k)]
                    if miss:
                        problems.append(f"{d['metadata']['name']}: agent.yaml lacks {miss}")
                    if "runtest" not in str(agent.get("test_command", "")):
                        problems.append(f"{d['metadata']['name']}: test_command does not run the connector")
                    if device.get("agent_name") != agent.get("agent_id"):
                        problems.append(f"{d['metadata']['name']}: device agent_name != agent_id")
        check(not problems, f"rendered manifests parse as YAML ({label})", "; ".join(problems))
        refs = agent_broker_checks(label, values, all_docs)
        if label == "default values":
            check(len(refs) == 2 and len(set(refs.values())) == 2,
                  "default values: the two agents read two different broker Secrets", str(refs))
        want = {"Deployment", "Service", "ConfigMap"}
        check(want <= set(kinds), f"rendered kinds include {sorted(want)} ({label})", str(sorted(set(kinds))))
        if label.startswith("authentication on"):
            flat = "\n".join(manifests.values())
            for needle in ("JWT_SIGNING_KEY", "tf-auth", "--token-file", "lp-1-token", "lp-1-amqp"):
                check(needle in flat, f"{needle} rendered ({label})")
        if label == "default values":
            check("Secret" in kinds and "JWT_SIGNING_KEY" in "\n".join(manifests.values()),
                  "default values: authentication on with a generated Secret")
            check(kinds.count("Deployment") == 3, "default values: one API and two agent Deployments",
                  f"{kinds.count('Deployment')} Deployments")
        else:
            check("Ingress" in kinds or "ingress" not in json.dumps(values),
                  f"ingress rendered when enabled ({label})")

    if renderer == "helm_python":
        try:
            import helm_python as helm
            report = helm.lint(str(CHART), strict=True)
            errs = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
            check(not errs and not report.get("errors"), "helm lint --strict", json.dumps(errs or report.get("errors")))
        except Exception as e:  # noqa: BLE001
            not_ok(f"helm lint: {e}")
    elif renderer == "helm":
        r = subprocess.run(["helm", "lint", "--strict", str(CHART)], capture_output=True, text=True)
        check(r.returncode == 0, "helm lint --strict", r.stdout + r.stderr)


def main():
    static_checks()
    renderer = find_renderer()
    if renderer:
        render_checks(renderer)
    elif os.environ.get("CHECK_CHART_RENDER") == "required":
        not_ok("rendering: neither helm nor helm_python is available")
    else:
        print("check-chart: no helm binary nor helm_python module: templates were checked "
              "statically, not rendered")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
