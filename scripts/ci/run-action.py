#!/usr/bin/env python3
"""Runs a composite GitHub Action's steps here, as the runner would: each step's `run:`
script with its `shell:`, its `env:` (with `${{ inputs.* }}`, `${{ steps.*.outputs.* }}`,
`${{ github.* }}`, `${{ runner.* }}` substituted), its `if:` condition, and the
GITHUB_OUTPUT / GITHUB_PATH files between steps. Prints the action's outputs as one
JSON line on stdout (after the steps' own output, which goes to stderr).

Usage: run-action.py ACTION_DIR [name=value ...]
       RUN_ACTION_CANCELLED=1 evaluates cancelled() as true (after the first failure).
Exit status: 0 when every step that ran succeeded, else the first failing step's.

Supports the expression subset our actions use: literals in single quotes, the
contexts above, ==, !=, &&, ||, !, parentheses, success(), failure(), cancelled(),
always(). Anything else is an error, so an action cannot silently outgrow this runner.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

TOKEN = re.compile(r"\s*(?:(\(|\)|&&|\|\||==|!=|!)|'((?:[^']|'')*)'|([A-Za-z_][\w.-]*(?:\(\))?))")


class Ctx:
    def __init__(self, inputs, github, runner):
        self.inputs = inputs
        self.github = github
        self.runner = runner
        self.steps = {}
        self.failed = False

    def lookup(self, name):
        parts = name.split(".")
        if parts[0] == "inputs" and len(parts) == 2:
            return self.inputs.get(parts[1], "")
        if parts[0] == "steps" and len(parts) == 4 and parts[2] == "outputs":
            return self.steps.get(parts[1], {}).get(parts[3], "")
        if parts[0] == "github" and len(parts) == 2:
            return self.github[parts[1]]
        if parts[0] == "runner" and len(parts) == 2:
            return self.runner[parts[1]]
        raise SystemExit(f"run-action: unsupported context '{name}'")

    def evaluate(self, expr):
        """Evaluates an expression to a Python value (str or bool)."""
        tokens = []
        pos = 0
        expr = expr.strip()
        while pos < len(expr):
            m = TOKEN.match(expr, pos)
            if not m or m.end() == pos:
                raise SystemExit(f"run-action: cannot parse '{expr}' at {pos}")
            pos = m.end()
            op, lit, ident = m.groups()
            if op:
                tokens.append(("op", op))
            elif lit is not None:
                tokens.append(("val", lit.replace("''", "'")))
            else:
                fn = {"success()": not self.failed, "failure()": self.failed,
                      "always()": True,
                      "cancelled()": os.environ.get("RUN_ACTION_CANCELLED") == "1"}
                if ident in fn:
                    tokens.append(("val", fn[ident]))
                elif ident in ("true", "false"):
                    tokens.append(("val", ident == "true"))
                else:
                    tokens.append(("val", self.lookup(ident)))
        self._t, self._i = tokens, 0
        v = self._or()
        if self._i != len(tokens):
            raise SystemExit(f"run-action: trailing tokens in '{expr}'")
        return v

    def _peek(self):
        return self._t[self._i] if self._i < len(self._t) else (None, None)

    def _or(self):
        v = self._and()
        while self._peek() == ("op", "||"):
            self._i += 1
            r = self._and()
            v = v if truthy(v) else r
        return v

    def _and(self):
        v = self._cmp()
        while self._peek() == ("op", "&&"):
            self._i += 1
            r = self._cmp()
            v = r if truthy(v) else v
        return v

    def _cmp(self):
        v = self._unary()
        while self._peek() in (("op", "=="), ("op", "!=")):
            op = self._peek()[1]
            self._i += 1
            r = self._unary()
            eq = str(v).lower() == str(r).lower() if isinstance(v, bool) or isinstance(r, bool) else v == r
            v = eq if op == "==" else not eq
        return v

    def _unary(self):
        kind, val = self._peek()
        if (kind, val) == ("op", "!"):
            self._i += 1
            return not truthy(self._unary())
        if (kind, val) == ("op", "("):
            self._i += 1
            v = self._or()
            if self._peek() != ("op", ")"):
                raise SystemExit("run-action: missing ')'")
            self._i += 1
            return v
        if kind == "val":
            self._i += 1
            return val
        raise SystemExit(f"run-action: unexpected token {val!r}")

    def substitute(self, text):
        def one(m):
            v = self.evaluate(m.group(1))
            return ("true" if v else "false") if isinstance(v, bool) else str(v)
        return re.sub(r"\$\{\{(.*?)\}\}", one, str(text))


def truthy(v):
    return bool(v) and v != "false"


def read_outputs(path):
    out = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^([\w-]+)<<(.+)$", line)
        if m:
            name, delim, value = m.group(1), m.group(2), []
            i += 1
            while i < len(lines) and lines[i] != delim:
                value.append(lines[i])
                i += 1
            out[name] = "\n".join(value)
        elif "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
        i += 1
    return out


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    action_dir = os.path.abspath(sys.argv[1])
    path = next((os.path.join(action_dir, n) for n in ("action.yaml", "action.yml")
                 if os.path.exists(os.path.join(action_dir, n))), None)
    if path is None:
        raise SystemExit(f"run-action: no action.yaml in {action_dir}")
    action = yaml.safe_load(open(path, encoding="utf-8"))
    assert action["runs"]["using"] == "composite", "only composite actions"
    given = dict(a.split("=", 1) for a in sys.argv[2:])
    declared = action.get("inputs", {}) or {}
    unknown = set(given) - set(declared)
    if unknown:
        raise SystemExit(f"run-action: unknown inputs {sorted(unknown)}")
    inputs = {}
    for name, spec in declared.items():
        spec = spec or {}
        if name in given:
            inputs[name] = given[name]
        elif "default" in spec:
            d = spec["default"]
            inputs[name] = ("true" if d else "false") if isinstance(d, bool) else str(d)
        elif spec.get("required"):
            raise SystemExit(f"run-action: input '{name}' is required")
        else:
            inputs[name] = ""
    work = tempfile.mkdtemp(prefix="run-action-")
    ctx = Ctx(inputs,
              {"action_path": action_dir, "workspace": os.getcwd(),
               "run_id": str(os.getpid())},
              {"temp": work, "name": "local"})
    path_additions = []
    rc = 0
    for n, step in enumerate(action["runs"]["steps"]):
        name = ctx.substitute(step.get("name", f"step {n}"))
        cond = step.get("if", "success()")
        cond = cond.strip()
        if cond.startswith("${{") and cond.endswith("}}"):
            cond = cond[3:-2]
        if not re.search(r"\b(success|failure|always|cancelled)\(\)", cond):
            cond = f"success() && ({cond})"
        if not truthy(ctx.evaluate(cond)):
            print(f"::: skipped: {name}", file=sys.stderr)
            continue
        print(f"::: run: {name}", file=sys.stderr)
        out_file = os.path.join(work, f"output-{n}")
        path_file = os.path.join(work, f"path-{n}")
        open(out_file, "w").close()
        open(path_file, "w").close()
        env = dict(os.environ)
        env.update({k: ctx.substitute(v) for k, v in (step.get("env") or {}).items()})
        env["GITHUB_OUTPUT"] = out_file
        env["GITHUB_PATH"] = path_file
        env["GITHUB_ACTION_PATH"] = action_dir
        env["RUNNER_TEMP"] = work
        if path_additions:
            env["PATH"] = ":".join(reversed(path_additions)) + ":" + env["PATH"]
        script = os.path.join(work, f"step-{n}.sh")
        with open(script, "w", encoding="utf-8") as f:
            f.write(ctx.substitute(step["run"]))
        shell = step.get("shell", "bash")
        if shell == "bash":
            argv = ["bash", "--noprofile", "--norc", "-eo", "pipefail", script]
        elif shell.endswith("{0}"):
            argv = shell.replace("{0}", script).split()
        else:
            raise SystemExit(f"run-action: unsupported shell '{shell}'")
        p = subprocess.run(argv, env=env, stdout=sys.stderr, stderr=sys.stderr)
        if step.get("id"):
            ctx.steps[step["id"]] = read_outputs(out_file)
        path_additions += [l for l in open(path_file).read().splitlines() if l]
        if p.returncode != 0:
            print(f"::: failed ({p.returncode}): {name}", file=sys.stderr)
            ctx.failed = True
            rc = rc or p.returncode
    outputs = {k: ctx.substitute(v.get("value", "")) for k, v in (action.get("outputs") or {}).items()}
    print(json.dumps(outputs))
    return rc


if __name__ == "__main__":
    sys.exit(main())
