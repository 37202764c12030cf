// Checks Grafana dashboards against Grafana's own dashboard type.
//
// The JSON schema is generated here, at each run, from the `Dashboard` type that
// Grafana publishes in the npm package @grafana/schema (the raw dashboard types), by
// ts-json-schema-generator 2.4.0 (later versions need a newer Node). It is strict where
// the types are: an object the types describe accepts no other key, so a misspelt
// dashboard or panel field fails. The types leave a panel's targets open (each data
// source has its own query model), so each target is checked here for what a
// Prometheus query needs: a refId and a non-empty expr. The raw types model only
// Grafana's built-in annotation target (tags); a data source's annotation carries its
// query there instead, so an annotation's `target` is left as open as a panel's
// target, and its expr is checked the same way. Nothing else is loosened.
//
// usage: node validate.mjs [--schema-out FILE] DASHBOARD.json...
// Exit status 0 when every dashboard passes; 1 with each problem printed otherwise.

import { readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { createGenerator } from "ts-json-schema-generator";
import AjvModule from "ajv";

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
const Ajv = AjvModule.default ?? AjvModule;

const args = process.argv.slice(2);
let schemaOut = null;
if (args[0] === "--schema-out") {
  schemaOut = args[1];
  args.splice(0, 2);
}
if (args.length === 0) {
  console.error("usage: node validate.mjs [--schema-out FILE] DASHBOARD.json...");
  process.exit(2);
}

const types = here("node_modules/@grafana/schema/dist/types/raw/dashboard/x/types.gen.d.ts");
const config = {
  path: types,
  type: "Dashboard",
  skipTypeCheck: true,
  additionalProperties: false,
};
const schema = createGenerator(config).createSchema(config.type);
const annotation = schema.definitions?.AnnotationQuery;
if (!annotation?.properties?.target) {
  console.error("@grafana/schema's AnnotationQuery has no target: update validate.mjs");
  process.exit(2);
}
annotation.properties.target = {
  type: "object",
  description: "A data source's annotation query (open, as a panel's targets are).",
};
if (schemaOut) {
  writeFileSync(schemaOut, JSON.stringify(schema, null, 2));
}
const version = JSON.parse(
  readFileSync(here("node_modules/@grafana/schema/package.json"), "utf8"),
).version;
const validate = new Ajv({ allErrors: true, strict: false }).compile(schema);

// Every panel, rows' panels included.
function panels(list) {
  const out = [];
  for (const p of list ?? []) {
    out.push(p);
    if (Array.isArray(p.panels)) out.push(...panels(p.panels));
  }
  return out;
}

let failed = false;
for (const file of args) {
  const problems = [];
  let dashboard;
  try {
    dashboard = JSON.parse(readFileSync(file, "utf8"));
  } catch (e) {
    console.log(`${file}: does not read as JSON: ${e.message}`);
    failed = true;
    continue;
  }
  if (!validate(dashboard)) {
    for (const e of validate.errors) {
      const extra = e.params?.additionalProperty
        ? ` (${e.params.additionalProperty})`
        : "";
      problems.push(`${e.instancePath || "/"}: ${e.message}${extra}`);
    }
  }
  let queries = 0;
  const all = panels(dashboard.panels);
  for (const p of all) {
    if (p.type === "row") continue;
    const where = `panel ${JSON.stringify(p.title ?? p.id)}`;
    if (!Array.isArray(p.targets) || p.targets.length === 0) {
      problems.push(`${where}: no targets`);
      continue;
    }
    for (const t of p.targets) {
      queries++;
      if (typeof t.refId !== "string" || t.refId === "") {
        problems.push(`${where}: a target without a refId`);
      }
      if (typeof t.expr !== "string" || t.expr.trim() === "") {
        problems.push(`${where}: target ${t.refId}: no PromQL expr`);
      }
    }
  }
  for (const a of dashboard.annotations?.list ?? []) {
    if (a.builtIn) continue;
    queries++;
    const expr = a.target?.expr;
    if (typeof expr !== "string" || expr.trim() === "") {
      problems.push(`annotation ${JSON.stringify(a.name)}: no PromQL expr`);
    }
  }
  if (problems.length > 0) {
    failed = true;
    console.log(`${file}: FAILS Grafana's Dashboard type (@grafana/schema ${version}):`);
    for (const p of problems) console.log(`  ${p}`);
  } else {
    console.log(
      `${file}: ok against @grafana/schema ${version}: ${all.length} panels, ${queries} queries`,
    );
  }
}
process.exit(failed ? 1 : 0);
