// pe-export's ort-web runtime: onnxruntime-web's WASM backend under Node (pe_export/ort_web.py drives it).
//
//   node ort_web.mjs MODEL.onnx THREADS
//
// Loads the model, answers one JSON line: {"ok": true, "provider": ...} or {"error": ...}. Then one
// request per stdin line, one JSON answer per stdout line:
//   {"op": "run",  "inputs": [{"name", "dtype", "shape", "path"}], "out": PATH}
//        -> output i's raw bytes written to PATH.i; {"ok": true, "outputs": [{"dtype", "shape"}]}
//   {"op": "time", "inputs": [...], "repeat": N}   -> {"ok": true, "times": [seconds of each run]}
// Inputs are raw little-endian files; int64 goes in as BigInt64Array, float16 as its bits (Uint16Array).
import { readFileSync, writeFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { performance } from "node:perf_hooks";
import * as ort from "onnxruntime-web";

const ARRAYS = { float32: Float32Array, float16: Uint16Array, int64: BigInt64Array, int32: Int32Array, float64: Float64Array, uint8: Uint8Array };

function answer(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function tensor({ dtype, shape, path }) {
  const bytes = readFileSync(path);
  // A Buffer is a view into a shared pool: copy out its own bytes before viewing them as a typed array.
  const own = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  return new ort.Tensor(dtype, new ARRAYS[dtype](own), shape);
}

function feeds(inputs) {
  return Object.fromEntries(inputs.map((i) => [i.name, tensor(i)]));
}

const [model, threads] = process.argv.slice(2);
ort.env.wasm.numThreads = Number(threads || 1);
ort.env.logLevel = "error";
let session;
try {
  session = await ort.InferenceSession.create(readFileSync(model), { executionProviders: ["wasm"], logSeverityLevel: 3 });
  answer({ ok: true, provider: `onnxruntime-web ${ort.env.versions.web} wasm (Node ${process.versions.node}, ${ort.env.wasm.numThreads} thread(s))` });
} catch (e) {
  answer({ error: String(e.message || e) });
  process.exit(0);
}

for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const req = JSON.parse(line);
  try {
    const inputs = feeds(req.inputs);
    if (req.op === "time") {
      const times = [];
      for (let i = 0; i < req.repeat; i++) {
        const t = performance.now();
        await session.run(inputs);
        times.push((performance.now() - t) / 1e3);
      }
      answer({ ok: true, times });
    } else {
      const results = await session.run(inputs);
      const outputs = session.outputNames.map((name, i) => {
        const out = results[name];
        const data = out.data;
        writeFileSync(`${req.out}.${i}`, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
        return { dtype: out.type, shape: out.dims };
      });
      answer({ ok: true, outputs });
    }
  } catch (e) {
    answer({ error: String(e.message || e) });
  }
}
