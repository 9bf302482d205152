// A pinrpc WhoAmI call made by Node's @grpc/grpc-js, a gRPC stack nobody on this project wrote.
// Usage: node whoami.js TARGET CERT KEY CA SERVER_NAME
// Prints the reply as JSON and exits 0; on a failed call prints {"code", "details"} to stderr
// and exits 1; on bad usage exits 2.
"use strict";
const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, cert, key, ca, serverName] = process.argv.slice(2);
if (!serverName) {
  console.error("usage: node whoami.js TARGET CERT KEY CA SERVER_NAME");
  process.exit(2);
}
const protos = path.resolve(__dirname, "..", "..", "..", "protos");
const definition = protoLoader.loadSync("pinrpc/v1/echo.proto", {
  includeDirs: [protos],
  keepCase: true, // field names as in the .proto, like the other clients print them
  defaults: true, // an empty allow list is [], not missing
});
const Echo = grpc.loadPackageDefinition(definition).pinrpc.v1.Echo;

const credentials = grpc.credentials.createSsl(
  fs.readFileSync(ca),
  fs.readFileSync(key),
  fs.readFileSync(cert),
);
// The test dials 127.0.0.1 but the server certificate names server.test.
const client = new Echo(target, credentials, {
  "grpc.ssl_target_name_override": serverName,
  "grpc.default_authority": serverName,
});
const deadline = new Date(Date.now() + 10000);
client.WhoAmI({}, { deadline }, (err, reply) => {
  client.close();
  if (err) {
    const code = Object.keys(grpc.status).find((name) => grpc.status[name] === err.code);
    console.error(JSON.stringify({ code, details: err.details }));
    process.exit(1);
  }
  console.log(
    JSON.stringify({
      name: reply.name,
      fingerprint: reply.fingerprint,
      allowed_methods: reply.allowed_methods,
    }),
  );
});
