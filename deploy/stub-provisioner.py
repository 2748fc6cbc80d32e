"""A stub of the Dokku provisioner service for local testing: speaks its wire contract, logs calls.

POST /provision {subscriptionId, accountId, tier, limits, appName, ...} -> {appName, subdomain, frontendUrl, backendUrl}
PUT /update {appName, limits} -> {ok}
DELETE /deprovision {appName} -> {ok} (404 when the app does not exist)
All calls require X-API-Key == $PROVISIONER_API_KEY.
"""
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_KEY = os.environ.get("PROVISIONER_API_KEY", "")
APPS = {}


class Handler(BaseHTTPRequestHandler):
    def _reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _handle(self, method):
        if API_KEY and self.headers.get("X-API-Key") != API_KEY:
            return self._reply(401, {"error": "invalid api key"})
        body = self._body()
        print(f"{method} {self.path} key={self.headers.get('Idempotency-Key')} body={json.dumps(body)}", flush=True)
        app = body.get("appName") or f"mr-{body.get('subscriptionId', 'unknown')}"
        if method == "POST" and self.path == "/provision":
            APPS[app] = body
            return self._reply(200, {"appName": app, "subdomain": f"{app}.localhost",
                                     "frontendUrl": f"http://{app}.localhost", "backendUrl": f"http://api.{app}.localhost"})
        if method == "PUT" and self.path == "/update":
            return self._reply(200 if app in APPS else 404, {"ok": app in APPS})
        if method == "DELETE" and self.path == "/deprovision":
            return self._reply(200 if APPS.pop(app, None) else 404, {"ok": True})
        return self._reply(404, {"error": "not found"})

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8002"))), Handler).serve_forever()
