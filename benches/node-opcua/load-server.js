"use strict";
// Load server for plantgate's pipeline benchmark: an independent OPC UA
// server (node-opcua) with N Double variables `LOAD/TAGnnnnn.CV` in its own
// namespace, all changing every 1/R s. Prints
//   READY <endpoint> <namespace-uri>
// once it listens, then once a second
//   STATS <changes so far> <ticks so far> <late ticks so far> <values sent so far>
// so the benchmark knows what the server really produced, and how many data
// values it sent to its clients in subscription notifications (a value
// changed but never sent was lost in the server: its sampling fell behind,
// or a monitored-item queue overflowed).
// With --load-control (the protocol of `plantgate simulate --load-control`,
// which prints the first three numbers only) the tags stay still until a
// `start` line on stdin (answer `STARTED`); a `stop` line stills them again
// and is answered with the totals,
//   STOPPED <changes> <ticks> <late ticks> <values sent>
// so a client can subscribe first and count every change from the start.
const path = require("path");
const { OPCUAServer } = require("node-opcua-server");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
const { MessageSecurityMode, SecurityPolicy } = require("node-opcua-secure-channel");
const { DataType } = require("node-opcua-variant");

function arg(name, dflt) {
    const i = process.argv.indexOf(name);
    return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}
const tags = parseInt(arg("--tags", "1000"), 10);
const rate = parseFloat(arg("--rate", "1"));
const port = parseInt(arg("--port", "4840"), 10);
const pki = arg("--pki", path.join(process.cwd(), "pki"));
const loadControl = process.argv.includes("--load-control");
const NS = "urn:plantgate:bench:node-opcua";

(async () => {
    const serverCertificateManager = new OPCUACertificateManager({ rootFolder: pki, automaticallyAcceptUnknownCertificate: true });
    const server = new OPCUAServer({
        port,
        hostname: "127.0.0.1",
        alternateHostname: ["127.0.0.1"],
        serverCertificateManager,
        securityModes: [MessageSecurityMode.None],
        securityPolicies: [SecurityPolicy.None],
        allowAnonymous: true,
        serverCapabilities: {
            maxMonitoredItems: 1000000,
            maxMonitoredItemsPerSubscription: 1000000,
            maxMonitoredItemsQueueSize: 60000,
            operationLimits: {
                maxMonitoredItemsPerCall: 100000,
                maxNodesPerRead: 100000,
                maxNodesPerBrowse: 100000,
                maxNodesPerTranslateBrowsePathsToNodeIds: 100000,
            },
        },
    });
    await server.initialize();
    const addressSpace = server.engine.addressSpace;
    const ns = addressSpace.registerNamespace(NS);
    const folder = ns.addFolder(addressSpace.rootFolder.objects, { browseName: "LOAD" });
    const vars = [];
    for (let i = 0; i < tags; i++) {
        const id = "LOAD/TAG" + String(i).padStart(5, "0") + ".CV";
        vars.push(ns.addVariable({
            componentOf: folder,
            browseName: id,
            nodeId: "s=" + id,
            dataType: DataType.Double,
            minimumSamplingInterval: 0,
            value: { dataType: DataType.Double, value: 0 },
        }));
    }
    await server.start();
    const endpoint = `opc.tcp://127.0.0.1:${port}`;
    process.stdout.write(`READY ${endpoint} ${NS}\n`);

    let tick = 0, changes = 0, late = 0, sent = 0;
    server.on("create_session", (session) => {
        session.on("new_subscription", (subscription) => {
            subscription.on("notification", (message) => {
                for (const data of message.notificationData || []) {
                    if (data && data.monitoredItems) sent += data.monitoredItems.length;
                }
            });
        });
    });
    let paused = loadControl;
    const period = 1000 / rate;
    let next = Date.now() + period;
    function step() {
        // Single-threaded: a `stop` is handled between two rounds, never
        // during one, so STOPPED reports every change made.
        if (!paused) {
            tick += 1;
            for (let i = 0; i < vars.length; i++) {
                const v = Math.sin(tick * 0.1 + i) * 50 + tick * 1e-3;
                vars[i].setValueFromSource({ dataType: DataType.Double, value: v });
            }
            changes += vars.length;
        }
        next += period;
        let wait = next - Date.now();
        if (wait < 0) {
            // Could not keep the rate: skip to now rather than burst.
            if (!paused) late += 1;
            next = Date.now() + period;
            wait = period;
        }
        setTimeout(step, wait);
    }
    if (tags > 0 && rate > 0) setTimeout(step, period);
    const totals = () => `${changes} ${tick} ${late} ${sent}`;
    setInterval(() => process.stdout.write(`STATS ${totals()}\n`), 1000);
    if (loadControl) {
        require("readline").createInterface({ input: process.stdin }).on("line", (line) => {
            const cmd = line.trim();
            if (cmd === "start") {
                paused = false;
                process.stdout.write("STARTED\n");
            } else if (cmd === "stop") {
                paused = true;
                process.stdout.write(`STOPPED ${totals()}\n`);
            } else if (cmd !== "") {
                console.error(`load control: unknown command ${JSON.stringify(cmd)} (start, stop)`);
            }
        });
    }
    const stop = async () => { await server.shutdown(0); process.exit(0); };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
})().catch((e) => { console.error(e); process.exit(1); });
