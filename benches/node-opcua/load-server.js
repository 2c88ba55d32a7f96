"use strict";
// Load server for plantgate's pipeline benchmark: an independent OPC UA
// server (node-opcua) with N Double variables `LOAD/TAGnnnnn.CV` in its own
// namespace, all changing every 1/R s. Prints
//   READY <endpoint> <namespace-uri>
// once it listens, then once a second
//   STATS <changes so far> <ticks so far> <late ticks so far>
// so the benchmark knows what the server really produced.
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

    let tick = 0, changes = 0, late = 0;
    const period = 1000 / rate;
    let next = Date.now() + period;
    function step() {
        tick += 1;
        for (let i = 0; i < vars.length; i++) {
            const v = Math.sin(tick * 0.1 + i) * 50 + tick * 1e-3;
            vars[i].setValueFromSource({ dataType: DataType.Double, value: v });
        }
        changes += vars.length;
        next += period;
        let wait = next - Date.now();
        if (wait < 0) {
            // Could not keep the rate: skip to now rather than burst.
            late += 1;
            next = Date.now() + period;
            wait = period;
        }
        setTimeout(step, wait);
    }
    if (tags > 0 && rate > 0) setTimeout(step, period);
    setInterval(() => process.stdout.write(`STATS ${changes} ${tick} ${late}\n`), 1000);
    const stop = async () => { await server.shutdown(0); process.exit(0); };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
})().catch((e) => { console.error(e); process.exit(1); });
