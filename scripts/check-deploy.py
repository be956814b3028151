#!/usr/bin/python3
"""Checks deploy/ (ctest Deploy.compose and Deploy.kubernetes).

  check-deploy.py compose --version=0.1.0      docker compose config -q + structure
  check-deploy.py kubernetes --version=0.1.0   kubectl kustomize + structure

Exit 0: valid; 1: a problem (printed); 77: the tool (docker compose / docker-compose,
kubectl) or python3-yaml is missing here, so the check is skipped (ctest shows it).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEPLOY = os.path.join(ROOT, "deploy")
SKIP = 77
# A base image reference that cannot move: a digest, a dated Debian tag, or x.y.z.
PINNED = re.compile(r"(@sha256:[0-9a-f]{64}$)|(:[\w.-]*\d{8}[\w.-]*$)|(:v?\d+\.\d+\.\d+[\w.-]*$)")

try:
    import yaml
except ImportError:
    print("check-deploy: SKIPPED: python3-yaml is not installed (scripts/setup.sh)")
    sys.exit(SKIP)


class Problems(list):
    def check(self, ok, message):
        if not ok:
            self.append(message)
        return ok


def run(cmd, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


def compose_tool():
    """`docker compose` (v2 plugin) if it runs, else docker-compose (v1), else None."""
    if shutil.which("docker") and run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def server_metric_names():
    with open(os.path.join(ROOT, "server", "metrics.cc")) as f:
        return set(re.findall(r'"(superpose_[a-z0-9_]+[a-z0-9])[ "{]', f.read()))


# ---- compose ----

def check_dockerfiles(p):
    for name in ["Dockerfile", "Dockerfile.cuda", "Dockerfile.nginx"]:
        with open(os.path.join(ROOT, "docker", name)) as f:
            text = f.read()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
        for ref in re.findall(r"^FROM (\S+)", text, re.M):
            ref = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), ref)
            p.check(PINNED.search(ref), f"docker/{name}: base image {ref} is not pinned")
    with open(os.path.join(ROOT, "docker", "Dockerfile.nginx")) as f:
        text = f.read()
    p.check("bookworm" in text and "install" in text and " nginx" in text,
            "docker/Dockerfile.nginx: not Debian bookworm's nginx")
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = f.read().split()
    for entry in [".git", "**/build*/"]:
        p.check(entry in ignored, f".dockerignore: {entry} is not excluded")


def replicas_of(services):
    return sorted(n for n, s in services.items()
                  if any("--model" in str(a) for a in s.get("command", []))
                  and s.get("image", "").startswith("superpose:"))


def check_compose_images(p, services, version):
    for name, s in services.items():
        image = s.get("image", "")
        p.check(":" in image and not image.endswith(":latest"),
                f"compose: service {name} has a moving image reference {image!r}")
        if image.startswith("superpose"):
            tag = image.split(":", 1)[1]
            p.check(tag == version or tag.startswith(version + "-"),
                    f"compose: service {name}: image {image} is not tagged with {version}")
        elif "build" not in s:
            p.check(PINNED.search(image), f"compose: service {name}: {image} is not pinned")


def check_compose_topology(p, services):
    replicas = replicas_of(services)
    p.check(len(replicas) >= 2, f"compose: {len(replicas)} server replicas, want >= 2")
    nginx = services.get("nginx", {})
    p.check(nginx.get("build", {}).get("dockerfile") == "docker/Dockerfile.nginx",
            "compose: nginx is not built from docker/Dockerfile.nginx")
    p.check(any(str(v).split(":")[0].endswith("deploy/nginx") for v in nginx.get("volumes", [])),
            "compose: nginx does not mount deploy/nginx")
    for r in replicas:
        p.check(r in nginx.get("depends_on", {}), f"compose: nginx does not wait for {r}")
    load = services.get("load", {})
    p.check(load.get("profiles") and "superpose-load" in str(load.get("entrypoint")),
            "compose: no one-shot superpose-load service under a profile")
    p.check(load.get("restart") in ("no", None), "compose: the load service restarts")
    nginx_text = ""
    for name in sorted(os.listdir(os.path.join(DEPLOY, "nginx"))):
        with open(os.path.join(DEPLOY, "nginx", name)) as f:
            nginx_text += f.read()
    with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    targets = {t for job in prom["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    for r in replicas:
        p.check(re.search(rf"\b{re.escape(r)}:50051\b", nginx_text),
                f"deploy/nginx: replica {r} is not an upstream server")
        p.check(f"{r}:9090" in targets, f"prometheus.yml: replica {r} is not scraped")
    p.check("x-superpose-affinity" in nginx_text or "x_superpose_affinity" in nginx_text,
            "deploy/nginx: no routing on the x-superpose-affinity header")
    p.check("grpc_pass" in nginx_text, "deploy/nginx: no grpc_pass")


def nginx_test(p, replicas):
    """`nginx -t` of deploy/nginx/nginx.conf as the image runs it, with the replicas'
    names pointed at 127.0.0.1 (nginx resolves upstream names while it loads)."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if nginx is None:
        print("check-deploy: nginx is not installed: skipping `nginx -t`")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in os.listdir(os.path.join(DEPLOY, "nginx")):
            with open(os.path.join(DEPLOY, "nginx", name)) as f:
                text = f.read()
            for r in replicas:
                text = re.sub(rf"\b{re.escape(r)}:", "127.0.0.1:", text)
            text = text.replace("/tmp/", tmp + "/")  # pid and temp paths
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        r = run([nginx, "-t", "-q", "-p", tmp, "-c", os.path.join(tmp, "nginx.conf"),
                 "-e", os.path.join(tmp, "error.log")])
        p.check(r.returncode == 0, f"deploy/nginx: nginx -t failed:\n{r.stdout}{r.stderr}")


def check_compose(version):
    tool = compose_tool()
    if tool is None:
        print("check-deploy: SKIPPED: neither `docker compose` nor docker-compose is installed")
        return SKIP
    p = Problems()
    path = os.path.join(DEPLOY, "docker-compose.yaml")
    with tempfile.TemporaryDirectory() as model:
        env = {"MODEL_DIR": model}
        r = run(tool + ["-f", path, "config", "-q"], env)
        if r.returncode != 0:
            print(f"check-deploy: {' '.join(tool)} config -q failed:\n{r.stdout}{r.stderr}")
            return 1
        rendered = yaml.safe_load(run(tool + ["-f", path, "config"], env).stdout)
    p.check(run(tool + ["-f", path, "config", "-q"], {"MODEL_DIR": ""}).returncode != 0,
            "compose: config passes without MODEL_DIR (it must insist on a model)")
    services = rendered["services"]
    check_compose_images(p, services, version)
    check_dockerfiles(p)
    snippet = os.path.join(DEPLOY, "nginx", "superpose.conf")
    if not os.path.exists(snippet):
        # The routing snippet comes from the load generator's branch (issue 14).
        if report(p, "compose (without deploy/nginx/superpose.conf)") != 0:
            return 1
        print("check-deploy: SKIPPED the nginx checks: deploy/nginx/superpose.conf is missing")
        return SKIP
    check_compose_topology(p, services)
    nginx_test(p, replicas_of(services))
    return report(p, f"compose ({' '.join(tool)} config -q, {len(services)} services)")


# ---- kubernetes ----

def by_kind(docs):
    out = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def check_workloads(p, kinds, version):
    deployments = kinds.get("Deployment", [])
    p.check(deployments, "kubernetes: no Deployment")
    for d in deployments:
        name = d["metadata"]["name"]
        pod = d["spec"]["template"]
        labels = pod["metadata"]["labels"]
        for c in pod["spec"]["containers"]:
            image = c["image"]
            tag = image.split("@")[0].rsplit(":", 1)[-1] if ":" in image else ""
            p.check("@sha256:" in image or tag.startswith(version),
                    f"kubernetes: {name}: image {image} is not an immutable {version} tag")
        spec = pod["spec"]
        p.check(spec.get("topologySpreadConstraints") or
                spec.get("affinity", {}).get("podAntiAffinity"),
                f"kubernetes: {name}: no topology spread or anti-affinity")
        p.check(any(selects(b["spec"]["selector"], labels)
                    for b in kinds.get("PodDisruptionBudget", [])),
                f"kubernetes: {name}: no PodDisruptionBudget")
        p.check(any(selects(n["spec"]["podSelector"], labels)
                    for n in kinds.get("NetworkPolicy", [])),
                f"kubernetes: {name}: no NetworkPolicy selects its pods")


def adapter_metrics():
    """Custom metric name -> the server metrics its prometheus-adapter rule reads."""
    with open(os.path.join(DEPLOY, "kubernetes", "prometheus-adapter-values.yaml")) as f:
        rules = yaml.safe_load(f)["rules"]["custom"]
    out = {}
    for r in rules:
        series = re.findall(r"superpose_[a-z0-9_]+", r["seriesQuery"] + r["metricsQuery"])
        out[r["name"]["as"]] = set(series)
    return out


def check_hpa(p, kinds):
    served = server_metric_names()
    adapted = adapter_metrics()
    for name, series in adapted.items():
        for s in series:
            p.check(s in served, f"prometheus-adapter rule {name}: {s} is not a server metric")
    deployments = {d["metadata"]["name"] for d in kinds.get("Deployment", [])}
    hpas = kinds.get("HorizontalPodAutoscaler", [])
    p.check(hpas, "kubernetes: no HorizontalPodAutoscaler")
    for h in hpas:
        p.check(h["spec"]["scaleTargetRef"]["name"] in deployments,
                f"kubernetes: HPA {h['metadata']['name']} scales a missing Deployment")
        for m in h["spec"]["metrics"]:
            metric = m.get("pods", {}).get("metric", {}).get("name", "")
            p.check(metric in adapted,
                    f"kubernetes: HPA metric {metric!r} has no prometheus-adapter rule")


def check_routing(p, kinds):
    services = {s["metadata"]["name"]: s for s in kinds.get("Service", [])}
    for kind in ["Gateway", "GRPCRoute", "ServiceMonitor"]:
        p.check(kinds.get(kind), f"kubernetes: no {kind}")
    for route in kinds.get("GRPCRoute", []):
        for rule in route["spec"]["rules"]:
            for ref in rule["backendRefs"]:
                svc = services.get(ref["name"])
                p.check(svc and any(pt["port"] == ref["port"] for pt in svc["spec"]["ports"]),
                        f"kubernetes: GRPCRoute backend {ref['name']}:{ref['port']} is missing")
    routes = {r["metadata"]["name"] for r in kinds.get("GRPCRoute", [])}
    hashed = False
    for pol in kinds.get("BackendTrafficPolicy", []):
        for ref in pol["spec"]["targetRefs"]:
            p.check(ref["name"] in routes, f"kubernetes: policy targets missing {ref['name']}")
        ch = pol["spec"].get("loadBalancer", {}).get("consistentHash", {})
        hashed |= ch.get("header", {}).get("name") == "x-superpose-affinity"
    p.check(hashed, "kubernetes: no consistent hash on x-superpose-affinity")
    for sm in kinds.get("ServiceMonitor", []):
        selected = [s for s in services.values()
                    if selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        for ep in sm["spec"]["endpoints"]:
            p.check(any(pt.get("name") == ep["port"] for s in selected
                        for pt in s["spec"]["ports"]),
                    f"kubernetes: ServiceMonitor port {ep['port']} is on no selected Service")


def kubectl():
    for k in ["/usr/bin/kubectl", shutil.which("kubectl")]:
        if k and os.access(k, os.X_OK):
            return k
    return None


def check_kubernetes(version):
    k = kubectl()
    if k is None:
        print("check-deploy: SKIPPED: kubectl is not installed (kubectl kustomize)")
        return SKIP
    r = run([k, "kustomize", os.path.join(DEPLOY, "kubernetes")])
    if r.returncode != 0:
        print(f"check-deploy: kubectl kustomize failed:\n{r.stderr}")
        return 1
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    with open(os.path.join(DEPLOY, "kubernetes", "superpose-gpu.yaml")) as f:
        gpu = [d for d in yaml.safe_load_all(f) if d]
    p = Problems()
    kinds = by_kind(docs)
    check_workloads(p, kinds, version)
    check_workloads(p, by_kind(gpu + kinds.get("NetworkPolicy", [])), version)
    check_hpa(p, kinds)
    check_routing(p, kinds)
    return report(p, f"kubernetes (kubectl kustomize, {len(docs)} objects)")


def report(problems, what):
    for m in problems:
        print(f"check-deploy: {m}")
    if problems:
        return 1
    print(f"check-deploy: {what}: ok")
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["compose", "kubernetes"])
    ap.add_argument("--version", required=True, help="CMake PROJECT_VERSION")
    args = ap.parse_args()
    return check_compose(args.version) if args.what == "compose" else check_kubernetes(args.version)


if __name__ == "__main__":
    sys.exit(main())
