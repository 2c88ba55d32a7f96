// The independent side of tests/sparkplug_mosquitto.rs: Eclipse Tahu's
// Sparkplug B codec (npm sparkplug-payload), not plantgate's.
//
//   node tahu.js decode   stdin: one {"topic","payload":<hex>} per line
//                         stdout: one {"topic","payload":<decoded>} per line
//   node tahu.js encode   stdin: one payload object (JSON; 64-bit values as
//                         strings); stdout: the encoded payload in hex
"use strict";
const sparkplug = require("sparkplug-payload").get("spBv1.0");
const Long = require("long");

// 64-bit integers come back as Long objects: as decimal strings in JSON.
function plain(value) {
  if (Long.isLong(value)) {
    return value.toString();
  }
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) {
    return Buffer.from(value).toString("base64");
  }
  if (Array.isArray(value)) {
    return value.map(plain);
  }
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) {
      out[k] = plain(v);
    }
    return out;
  }
  return value;
}

function readAll() {
  return require("fs").readFileSync(0, "utf8");
}

const mode = process.argv[2];
if (mode === "decode") {
  for (const line of readAll().split("\n")) {
    if (!line.trim()) {
      continue;
    }
    const { topic, payload } = JSON.parse(line);
    let decoded;
    try {
      decoded = plain(sparkplug.decodePayload(Buffer.from(payload, "hex")));
    } catch (e) {
      decoded = { decode_error: String(e) };
    }
    process.stdout.write(JSON.stringify({ topic, payload: decoded }) + "\n");
  }
} else if (mode === "encode") {
  const payload = JSON.parse(readAll());
  process.stdout.write(Buffer.from(sparkplug.encodePayload(payload)).toString("hex") + "\n");
} else {
  process.stderr.write("usage: node tahu.js decode|encode\n");
  process.exit(2);
}
