// Builds a JavaScript saga step into a sagahost plugin component.
//
//     node build.mjs <source.js> <out.wasm> [--wit <dir>] [--out <out.wasm>]
//
// (`npm run build` runs it with the project's arguments.) It needs Node.js 20
// or later. The first build installs the toolchain pinned in
// package-lock.json (`npm ci`), and so does any build after package-lock.json
// changed or an install was cut short.
//
// <dir> holds the sagahost:plugin WIT (`step.wit` + `deps/*.wit`, a copy of
// the repo's `wit/0.2.0/`); `--out` overrides <out.wasm>.
//
// Why not build against the `step` world of <dir> directly: componentize-js
// links a binding for every interface the target world reaches, used or not.
// `step@0.2.0` imports `wasi:http/outgoing-handler`, whose types use
// `wasi:clocks/monotonic-clock`, so the component would import the clock and
// the host refuses clocks. This script builds against the same world minus
// the HTTP import instead (which is what a Rust step that sends no request
// imports too): `sagahost:plugin/{types,state,log}` and the two exports, and
// it disables every StarlingMonkey feature that needs WASI (stdio, random,
// clocks, fetch), so the component imports nothing else. In exchange: no
// `console.log` (use the `log` import), no `fetch`, no timers, and
// `Math.random` is deterministic.
//
// package.json pins @bytecodealliance/preview2-shim although this script does
// not import it: componentize-js 0.23.0 imports it at run time but declares
// it only as a dev dependency, and 0.26 no longer lets it read the temporary
// WIT directory, so 0.25.0 (the version it was found working with) is pinned.
import { execFileSync } from 'node:child_process';
import {
  existsSync,
  mkdtempSync,
  mkdirSync,
  readFileSync,
  readdirSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const nodeMajor = Number(process.versions.node.split('.')[0]);
if (nodeMajor < 20) {
  console.error(`node ${process.version} is too old: the pinned toolchain (componentize-js) needs Node.js 20 or later`);
  process.exit(3);
}

// npm writes node_modules/.package-lock.json when an install completes (and
// `npm ci` first removes node_modules): missing means never installed or cut
// short, older than package-lock.json means the lock changed since. Either
// way, install again (plugins/js/build of sagahost follows the same rule).
const project = dirname(fileURLToPath(import.meta.url));
const installed = join(project, 'node_modules', '.package-lock.json');
if (!existsSync(installed) || statSync(join(project, 'package-lock.json')).mtimeMs > statSync(installed).mtimeMs) {
  console.error('installing the toolchain: npm ci');
  execFileSync('npm', ['ci', '--prefer-offline', '--no-audit', '--no-fund'], { cwd: project, stdio: 'inherit' });
}
const { componentize } = await import('@bytecodealliance/componentize-js');

function usage(message) {
  console.error(`${message}\nusage: node build.mjs <source.js> <out.wasm> [--wit <dir>] [--out <out.wasm>]`);
  process.exit(2);
}

const positional = [];
let witDir = 'wit';
let out;
for (let i = 2; i < process.argv.length; i++) {
  const arg = process.argv[i];
  if (arg === '--wit' || arg === '--out') {
    const value = process.argv[++i];
    if (value === undefined) usage(`${arg} needs a value`);
    if (arg === '--wit') witDir = value;
    else out = value;
  } else {
    positional.push(arg);
  }
}
if (positional.length !== 2) usage('expected a source file and an output file');
const [source] = positional;
out ??= positional[1];

// The package version of the contract, e.g. `0.2.0`, from `package sagahost:plugin@X;`.
const stepWit = readFileSync(join(witDir, 'step.wit'), 'utf8');
const version = /^package\s+sagahost:plugin@([^;\s]+)\s*;/m.exec(stepWit)?.[1];
if (!version) usage(`${witDir}/step.wit does not declare package sagahost:plugin@<version>`);

// A WIT directory whose main package is a one-world local package, with the
// contract and its WASI dependencies as deps.
const work = mkdtempSync(join(tmpdir(), 'sagahost-js-'));
try {
  mkdirSync(join(work, 'deps'));
  writeFileSync(join(work, 'deps', 'sagahost-plugin.wit'), stepWit);
  const deps = join(witDir, 'deps');
  for (const file of readdirSync(deps).filter((f) => f.endsWith('.wit'))) {
    writeFileSync(join(work, 'deps', file), readFileSync(join(deps, file)));
  }
  writeFileSync(
    join(work, 'world.wit'),
    `package local:js-step;

/// sagahost:plugin/step@${version} without wasi:http.
world step {
  use sagahost:plugin/types@${version}.{call-context, step-outcome, step-error};
  import sagahost:plugin/state@${version};
  import sagahost:plugin/log@${version};
  export execute: func(ctx: call-context, input: string) -> result<step-outcome, step-error>;
  export compensate: func(ctx: call-context, input: string, output: string) -> result<string, step-error>;
}
`,
  );

  const { component } = await componentize({
    sourcePath: source,
    witPath: work,
    worldName: 'step',
    disableFeatures: ['stdio', 'random', 'clocks', 'http', 'fetch-event'],
  });
  mkdirSync(dirname(out), { recursive: true });
  // Written beside its final name, then renamed to it (atomic on one file system): a build cut
  // short leaves the last good component or none, never a truncated one that looks built.
  writeFileSync(`${out}.tmp`, component);
  renameSync(`${out}.tmp`, out);
  console.error(`built ${out} (${component.length} bytes, sagahost:plugin@${version})`);
} finally {
  rmSync(work, { recursive: true, force: true });
}
