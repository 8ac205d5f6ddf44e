// pe-export's ort-web-browser runtime: onnxruntime-web in a real (headless Chromium) page.
// pe_export/ort_web_browser.py serves this folder at /page/, onnxruntime-web's dist/ at /ort/ and the
// model, inputs and outputs at /data/ (127.0.0.1 only), and calls window.pe over the DevTools protocol:
//   await pe.load({ model, backend, threads, float16 }) -> { provider } or { error } or { skip } or { unsupported }
//        backend "wasm", or "webgpu": { skip } saying what the browser said when it offers no adapter,
//        { unsupported } for a float16 model on an adapter without shader-f16
//   await pe.run({ inputs: [{ name, dtype, shape, url }], out })   -> { dtype, shape } (output PUT to `out`)
//   await pe.run({ inputs, out, all: true })                      -> { outputs: [{ dtype, shape }] } (output i PUT to `out`.i)
//   await pe.time({ inputs, repeat })                              -> { times: [seconds of each run] }
// Inputs are raw little-endian bytes; int64 goes in as BigInt64Array, float16 as its bits (Uint16Array).
const ARRAYS = { float32: Float32Array, float16: Uint16Array, int64: BigInt64Array, int32: Int32Array, float64: Float64Array, uint8: Uint8Array };
let ort, session;

async function webgpuAdapter() {
  // What the browser says about WebGPU, whether or not it is used.
  if (!("gpu" in navigator)) return { adapter: null, says: "navigator.gpu is undefined" };
  try {
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) return { adapter: null, says: "navigator.gpu.requestAdapter() returned null" };
    const info = adapter.info || {};
    const name = [info.vendor, info.architecture, info.device, info.description].filter(Boolean).join(" ") || "unnamed";
    return { adapter, says: `adapter ${name}${adapter.isFallbackAdapter || info.isFallbackAdapter ? " (fallback)" : ""}` };
  } catch (e) {
    return { adapter: null, says: `navigator.gpu.requestAdapter() threw ${e.message || e}` };
  }
}

async function tensor({ dtype, shape, url }) {
  const bytes = await (await fetch(url)).arrayBuffer();
  return new ort.Tensor(dtype, new ARRAYS[dtype](bytes), shape);
}

async function feeds(inputs) {
  return Object.fromEntries(await Promise.all(inputs.map(async (i) => [i.name, await tensor(i)])));
}

async function load({ model, backend, threads, float16 }) {
  try {
    const gpu = backend === "webgpu" ? await webgpuAdapter() : null;
    if (gpu && !gpu.adapter) return { skip: `no WebGPU adapter in this browser: ${gpu.says}` };
    // Without the feature every fp16 kernel fails at run time ("requires f16 but the device does not support it").
    if (gpu && float16 && !gpu.adapter.features.has("shader-f16")) return { unsupported: `the WebGPU ${gpu.says} lacks shader-f16` };
    ort = await import(gpu ? "/ort/ort.webgpu.min.mjs" : "/ort/ort.wasm.min.mjs");
    ort.env.wasm.numThreads = threads;
    ort.env.wasm.wasmPaths = "/ort/";
    ort.env.logLevel = "error";
    if (gpu) ort.env.webgpu.adapter = gpu.adapter;
    const bytes = new Uint8Array(await (await fetch(model)).arrayBuffer());
    session = await ort.InferenceSession.create(bytes, { executionProviders: [backend], logSeverityLevel: 3 });
    const browser = navigator.userAgent.match(/(Headless)?Chrome\/[\d.]+/)[0];
    const isolated = self.crossOriginIsolated ? "" : ", not cross-origin isolated";
    const where = gpu ? `WebGPU ${gpu.says}` : `${ort.env.wasm.numThreads} thread(s)${isolated}`;
    return { provider: `onnxruntime-web ${ort.env.versions.web} ${backend} in ${browser} (${where})` };
  } catch (e) {
    return { error: String(e.message || e) };
  }
}

async function run({ inputs, out, all }) {
  try {
    const results = await session.run(await feeds(inputs));
    const put = async (y, url) => {
      const data = y.data;
      await fetch(url, { method: "PUT", body: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) });
      return { dtype: y.type, shape: y.dims };
    };
    if (!all) return await put(results[session.outputNames[0]], out);
    // every output, output i PUT to `${out}.${i}` (rewrite's checks read them all)
    const outputs = [];
    for (const [i, name] of session.outputNames.entries()) outputs.push(await put(results[name], `${out}.${i}`));
    return { outputs };
  } catch (e) {
    return { error: String(e.message || e) };
  }
}

async function time({ inputs, repeat }) {
  try {
    const f = await feeds(inputs);
    const times = [];
    for (let i = 0; i < repeat; i++) {
      const t = performance.now();
      await session.run(f);
      times.push((performance.now() - t) / 1e3);
    }
    return { times };
  } catch (e) {
    return { error: String(e.message || e) };
  }
}

window.pe = { load, run, time };
