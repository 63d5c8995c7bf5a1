// chatstream web UI: sends messages to /chat_stream and renders the streamed answer.
// Each chunk of ChatStream's stream is the whole answer so far followed by <::EOS::>, so the
// answer shown is the text before the last complete marker. Too-many-requests and errors are
// shown as notices, never as answer text.
(() => {
  "use strict";
  const EOS = "<::EOS::>";
  const $ = (id) => document.getElementById(id);
  const log = $("log"), input = $("input"), send = $("send"), stop = $("stop");
  let controller = null;

  function add(kind, text) {
    const div = document.createElement("div");
    div.className = "msg " + kind;
    div.textContent = text;
    log.appendChild(div);
    log.scrollTop = log.scrollHeight;
    return div;
  }

  function busy(on) {
    send.disabled = on; $("regenerate").disabled = on; $("clear").disabled = on; stop.disabled = !on;
  }

  function lastAnswer(buffer) {
    const end = buffer.lastIndexOf(EOS);
    if (end < 0) return null;
    const start = buffer.lastIndexOf(EOS, end - 1);
    return buffer.slice(start < 0 ? 0 : start + EOS.length, end);
  }

  // `undo` puts the page back when no answer came (removes the bubble by default).
  async function ask(body, bubble, undo = () => bubble.remove()) {
    controller = new AbortController();
    busy(true);
    let shown = false;
    try {
      const res = await fetch("chat_stream", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body), signal: controller.signal, credentials: "same-origin",
      });
      const type = res.headers.get("Content-Type") || "";
      if (!res.ok || type.startsWith("application/json")) {
        const err = await res.json().catch(() => ({}));
        undo();
        if (err.error === "too_many_requests") add("notice", "The server is busy. Please try again in a moment.");
        else add("notice", "Error " + res.status + ": " + (err.message || err.error || res.statusText));
        return false;
      }
      const reader = res.body.getReader();
      const decoder = new TextDecoder("utf-8");
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        const answer = lastAnswer(buffer);
        if (answer !== null) {
          bubble.textContent = answer; shown = true;
          // keep only the last chunk: every chunk repeats the whole answer
          buffer = buffer.slice(buffer.lastIndexOf(EOS) - answer.length);
          log.scrollTop = log.scrollHeight;
        }
      }
      return true;
    } catch (e) {
      if (!shown) undo();
      add("notice", e.name === "AbortError" ? "Stopped." : "Connection error: " + e.message);
      return false;
    } finally {
      controller = null;
      busy(false);
      input.focus();
    }
  }

  $("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    $("welcome")?.remove();
    add("user", text);
    ask({ user_input: text }, add("assistant", "…"));
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("form").requestSubmit(); }
  });
  stop.addEventListener("click", () => controller?.abort());
  $("regenerate").addEventListener("click", () => {
    const answers = log.querySelectorAll(".assistant");
    const last = answers[answers.length - 1];
    if (!last) { add("notice", "Nothing to regenerate yet."); return; }
    const previous = last.textContent;
    last.textContent = "…";
    ask({ regenerate: true }, last, () => { last.textContent = previous; });
  });
  $("clear").addEventListener("click", async () => {
    const res = await fetch("clear_context", { method: "POST", credentials: "same-origin" });
    if (res.ok) { log.replaceChildren(); add("notice", "Conversation cleared."); }
    else add("notice", "Error " + res.status + " while clearing.");
  });
})();
