// The chart's dashboard as Grafana's published types describe it (@grafana/schema, @grafana/prometheus).
// tests/cluster/test_dashboard_schema.py assigns the dashboard JSON to a constant of type `ChartDashboard`
// and runs `tsc --noEmit --strict`; nothing here is compiled into anything.
//
// The types are Grafana's own. Only three things are narrowed here, each where Grafana's type is open:
// a panel's `options` and `targets` (`Record<string, unknown>` in the dashboard schema) take the types of
// the timeseries panel plugin and of the Prometheus query; a variable's `query` takes the Prometheus variable
// query. Supporting another panel type means adding its panelcfg types here, the way timeseries is added.

import type { Dashboard, Panel, VariableModel } from '@grafana/schema';
import type {
  FieldConfig as TimeSeriesFieldConfig,
  Options as TimeSeriesOptions,
} from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
import type { Prometheus, PromVariableQuery } from '@grafana/prometheus';

// JSON holds an enum's value, not the enum: a string enum becomes the union of its values (a numeric enum
// already accepts its number literals), recursively, keeping optional and required properties as they are.
type Json<T> = T extends string
  ? `${T}`
  : T extends readonly (infer U)[]
    ? Json<U>[]
    : T extends object
      ? { [K in keyof T]: Json<T[K]> }
      : T;

export type PrometheusTarget = Json<Prometheus>;

export type TimeSeriesPanel = Json<
  Omit<Panel<TimeSeriesOptions, TimeSeriesFieldConfig>, 'type' | 'options' | 'targets'>
> & {
  type: 'timeseries';
  options: Json<TimeSeriesOptions>;
  targets: PrometheusTarget[];
};

type Variable = Json<Omit<VariableModel, 'type' | 'query'>>;
export type QueryVariable = Variable & { type: 'query'; query: Json<PromVariableQuery> };
export type DatasourceVariable = Variable & { type: 'datasource'; query: 'prometheus' };

export type ChartDashboard = Json<Omit<Dashboard, 'panels' | 'templating'>> & {
  panels: TimeSeriesPanel[];
  templating: { list: (QueryVariable | DatasourceVariable)[] };
};
