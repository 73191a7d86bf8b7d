"""A loopback HTTP server for download tests: plain URLs and the Hugging Face Hub's resolve
endpoint, with no network."""
import hashlib
import http.server
import threading
from typing import Optional

COMMIT = 'a' * 40


class LoopbackServer:
    """Serves `routes` ({url path: bytes}) on 127.0.0.1 until closed, or `timeout` seconds at most
    (None: until closed).

    Paths under `truncated` announce their full length but send half; Hub paths
    (`/{org}/{repo}/resolve/main/{file}`) carry the headers huggingface_hub needs.
    """

    def __init__(self, timeout: Optional[float] = 300):
        self.routes, self.truncated, self.gets, self.heads = {}, set(), [], []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                server.heads.append(self.path)
                self._respond(send_body=False)

            def do_GET(self):
                server.gets.append(self.path)
                self._respond(send_body=True)

            def _respond(self, send_body):
                body = server.routes.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header('X-Error-Code', 'EntryNotFound')
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header('Content-Length', str(len(body)))
                if '/resolve/' in self.path:
                    self.send_header('X-Repo-Commit', COMMIT)
                    self.send_header('ETag', f'"{hashlib.sha256(body).hexdigest()}"')
                self.end_headers()
                if send_body:
                    cut = len(body) // 2 if self.path in server.truncated else len(body)
                    self.wfile.write(body[:cut])
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.watchdog = None
        if timeout is not None:  # a test that hangs must not leave the server behind it
            self.watchdog = threading.Timer(timeout, self.httpd.shutdown)
            self.watchdog.daemon = True
            self.watchdog.start()

    def close(self):
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
