"""The chart's Grafana dashboard type-checks against Grafana's own published dashboard schema.

Debian (bookworm) packages no Grafana, so the schema comes from npm: `@grafana/schema` (the dashboard model
Grafana generates from its CUE kinds: `Dashboard`, `Panel`, `VariableModel`, `DataSourceRef`, and the panel
plugins' options such as the timeseries `Options` and `FieldConfig`) and `@grafana/prometheus` (the Prometheus
query, `Prometheus`, and variable query, `PromVariableQuery`), pinned in grafana/package.json to the Grafana
release of the same version. The test writes a TypeScript file that assigns the dashboard JSON, as an object
literal, to a constant of the type in grafana/schema.ts, and runs `tsc --noEmit --strict`: so a property the
schema does not know is an excess property, a missing required one is an error, and a string or number
outside a literal union or enum (panel type, tooltip mode, variable refresh ...) is rejected. (Importing the
JSON with `resolveJsonModule` would widen every literal to `string` or `number` and check much less.)

The classic dashboard model (the `Dashboard` type, `schemaVersion` numbering) is the one checked, not the
dashboard v2 schema that `@grafana/schema` also ships: the chart's ConfigMap is read by Grafana's dashboard
sidecar and file provisioning, which load the classic JSON model, and v2 is a different document (a
Kubernetes-style resource of elements and layouts) that this file is not.

What a type check cannot see: whether PromQL parses or names exported metrics (test_observability.py
cross-checks the names), whether `unit` is a unit Grafana knows, whether `${datasource}` names a Prometheus
data source, whether panels overlap in the grid, or any field typed `unknown`/`any` in Grafana's schema
(override property values; the Prometheus query's `scopes` and `adhocFilters`, typed by `@grafana/data`,
which is not installed).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

GRAFANA = Path(__file__).parent / "grafana"
DASHBOARD = Path(__file__).parents[2] / "charts" / "llm-endpoints" / "dashboards" / "llm-endpoints.json"


Dashboard = dict[str, Any]


@pytest.fixture(scope="module")
def grafana_types() -> Path:
    """The pinned npm packages, installed from the lock file on first use."""
    for tool in ("node", "npm"):
        assert shutil.which(tool), f"{tool} is missing: Node.js 20 with npm is needed (see the README)"
    if not (GRAFANA / "node_modules" / "@grafana" / "schema").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=GRAFANA,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return GRAFANA


def typecheck(dashboard: Dashboard, workdir: Path) -> tuple[list[str], list[str]]:
    """Runs tsc on `dashboard` typed as `ChartDashboard`; returns the source lines and tsc's error lines."""
    source = (
        f"import type {{ ChartDashboard }} from {json.dumps(str(GRAFANA / 'schema'))};\n\n"
        f"export const dashboard: ChartDashboard = {json.dumps(dashboard, indent=2)};\n"
    )
    (workdir / "dashboard.ts").write_text(source)
    tsconfig = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "skipLibCheck": True,  # @grafana/prometheus's own .d.ts files import React and @grafana/ui
            "module": "nodenext",
            "target": "es2022",
            "types": [],
        },
        "files": ["dashboard.ts"],
    }
    (workdir / "tsconfig.json").write_text(json.dumps(tsconfig))
    result = subprocess.run(
        [str(GRAFANA / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json", "--pretty", "false"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors: list[str] = []  # each error with its indented continuation lines
    for line in result.stdout.splitlines():
        if re.match(r"\S+\(\d+,\d+\): error TS", line):
            errors.append(line)
        elif errors and line.startswith(" "):
            errors[-1] += "\n" + line
    assert (result.returncode == 0) == (errors == []), result.stdout + result.stderr
    return source.splitlines(), errors


def error_lines(source: list[str], errors: list[str]) -> list[str]:
    """The source line each error points at."""
    lines = []
    for error in errors:
        where = re.match(r"dashboard\.ts\((\d+),", error)
        assert where is not None, error
        lines.append(source[int(where[1]) - 1].strip())
    return lines


def chart_dashboard() -> Dashboard:
    dashboard: Dashboard = json.loads(DASHBOARD.read_text())
    return dashboard


def test_the_chart_dashboard_matches_grafanas_schema(grafana_types: Path, tmp_path: Path) -> None:
    dashboard = chart_dashboard()
    assert [panel["type"] for panel in dashboard["panels"]].count("timeseries") == len(dashboard["panels"])
    _, errors = typecheck(dashboard, tmp_path)
    assert errors == []


def test_the_dashboard_declares_the_current_schema_version(grafana_types: Path) -> None:
    """Grafana migrates older dashboards on load; this one is written for the pinned release's model."""
    result = subprocess.run(
        ["node", "-e", "console.log(require('@grafana/schema').defaultDashboard.schemaVersion)"],
        cwd=grafana_types,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    current = int(result.stdout)
    assert current >= 42  # Grafana 12 and 13
    assert chart_dashboard()["schemaVersion"] == current


def misspell_panel_title(d: Dashboard) -> None:
    d["panels"][3]["titel"] = d["panels"][3].pop("title")


def widen_grid_with_a_string(d: Dashboard) -> None:
    d["panels"][0]["gridPos"]["w"] = "12"


def misspell_a_query_expr(d: Dashboard) -> None:
    d["panels"][5]["targets"][1]["exp"] = d["panels"][5]["targets"][1].pop("expr")


def use_the_removed_graph_panel(d: Dashboard) -> None:
    d["panels"][2]["type"] = "graph"


def unknown_tooltip_mode(d: Dashboard) -> None:
    d["panels"][7]["options"]["tooltip"]["mode"] = "all"


def unknown_variable_refresh(d: Dashboard) -> None:
    d["templating"]["list"][1]["refresh"] = 3


def drop_schema_version(d: Dashboard) -> None:
    del d["schemaVersion"]


@pytest.mark.parametrize(
    ("mistake", "at", "message"),
    [
        (misspell_panel_title, '"titel":', "'\"titel\"' does not exist in type 'TimeSeriesPanel'"),
        (widen_grid_with_a_string, '"w": "12"', "Type 'string' is not assignable to type 'number'"),
        (misspell_a_query_expr, '"exp":', "'\"exp\"' does not exist"),
        (use_the_removed_graph_panel, '"type": "graph"', "Type '\"graph\"' is not assignable"),
        (unknown_tooltip_mode, '"mode": "all"', "Type '\"all\"' is not assignable"),
        (unknown_variable_refresh, '"refresh": 3', "Type '3' is not assignable to type 'VariableRefresh"),
        (drop_schema_version, "export const dashboard", "Property 'schemaVersion' is missing"),
    ],
)
def test_a_mistake_in_the_dashboard_is_rejected_at_its_field(
    grafana_types: Path, tmp_path: Path, mistake: Callable[[Dashboard], None], at: str, message: str
) -> None:
    dashboard = copy.deepcopy(chart_dashboard())
    mistake(dashboard)
    source, errors = typecheck(dashboard, tmp_path)
    assert len(errors) == 1, errors
    assert message in errors[0]
    assert error_lines(source, errors)[0].startswith(at), (errors, error_lines(source, errors))
