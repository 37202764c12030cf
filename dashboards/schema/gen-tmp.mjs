import { createGenerator } from "ts-json-schema-generator";
import { writeFileSync } from "node:fs";
const config = { path: process.argv[2], type: "Dashboard", skipTypeCheck: true, additionalProperties: false };
const s = createGenerator(config).createSchema("Dashboard");
writeFileSync("/tmp/veneer.schema.json", JSON.stringify(s, null, 1));
