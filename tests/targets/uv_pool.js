// libuv's thread pool starts on the first fs call: a test target for threads that appear
const fs = require("fs");
const readline = require("readline");
const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (line === "fs") {
    fs.readFile(__filename, (err, data) => {
      console.log(err ? "error " + err.code : "read " + data.length);
    });
  } else if (line === "quit") {
    process.exit(0);
  }
});
console.log("ready");
