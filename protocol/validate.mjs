// Check the protocol spec with the reference AsyncAPI parser (@asyncapi/parser, pinned in
// package.json): print every diagnostic, and exit 1 on any error-level one.
//
//   npm ci --prefix protocol          # once
//   node protocol/validate.mjs [file] # default: protocol/asyncapi.yaml
import { readFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { DiagnosticSeverity, Parser } from "@asyncapi/parser";

const here = path.dirname(fileURLToPath(import.meta.url));
const file = path.resolve(process.argv[2] ?? path.join(here, "asyncapi.yaml"));
const severities = ["error", "warning", "information", "hint"];

const { document, diagnostics } = await new Parser().parse(await readFile(file, "utf8"), { source: file });
for (const diagnostic of diagnostics) {
  const where = diagnostic.path.length ? diagnostic.path.join(".") : "(document)";
  console.log(`${severities[diagnostic.severity]} ${diagnostic.code}: ${diagnostic.message} at ${where}`);
}
const errors = diagnostics.filter((diagnostic) => diagnostic.severity === DiagnosticSeverity.Error);
if (document === undefined || errors.length > 0) {
  console.log(`${path.basename(file)}: not valid AsyncAPI (${errors.length} errors)`);
  process.exit(1);
}
console.log(`${path.basename(file)}: valid AsyncAPI ${document.version()} (${diagnostics.length} diagnostics, none an error)`);
