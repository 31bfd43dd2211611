// Server-sent events read from a fetch() body: EventSource cannot send the X-API-Key header, fetch can.

// The text/event-stream format (WHATWG HTML §9.2): lines; "field: value"; a blank line dispatches.
export async function* readEvents(body, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const abort = () => reader.cancel().catch(() => {});
  signal.addEventListener("abort", abort, {once: true});
  let buffer = "", data = [], name = "", id = null, ended = false;
  try {
    for (;;) {
      const {done, value} = await reader.read();
      if (done) { ended = true; break; }
      buffer += value;
      const held = buffer.endsWith("\r") ? "\r" : "";  // maybe the first half of a \r\n: wait for the next chunk
      const lines = (held ? buffer.slice(0, -1) : buffer).split(/\r\n|\r|\n/);
      buffer = lines.pop() + held;
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield {event: name || "message", data: data.join("\n"), id};
          data = []; name = "";
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") data.push(value);
        else if (field === "event") name = value;
        else if (field === "id" && !value.includes("\0")) id = value;
      }
    }
  } finally {
    signal.removeEventListener("abort", abort);
    if (!ended) abort();  // the consumer stopped early (a terminal status): close the connection
  }
  if (signal.aborted) throw new DOMException("aborted", "AbortError");
}
