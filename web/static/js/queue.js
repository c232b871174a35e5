// The queue and history panel, as ComfyUI's: pending prompts (cancel), the running one (interrupt), finished
// runs with their status and output thumbnails; a click loads that run's workflow back into the canvas.
// It refreshes on the websocket's `status` (every queue change, for every client) and on the run's own events.
// The history shows a page of runs at a time, the newest first; "older" and "newer" page through the rest.

import { api, request, viewUrl } from "./api.js";
import { isVideo } from "./nodes.js";

const HISTORY_ITEMS = 50; // a page
const REFRESH_DELAY_MS = 100; // a burst of messages (a run's end, a batch queued) costs one refresh

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// The document to reopen: the editor's own graph (layout and all) when the editor queued it, else the API prompt.
function workflowOf(queueEntry) {
  const [, , prompt, extra] = queueEntry;
  return (extra && extra.extra_pnginfo && extra.extra_pnginfo.workflow) || prompt;
}

function firstImage(outputs) {
  for (const output of Object.values(outputs || {})) {
    if (output.images && output.images.length) return output.images[0];
  }
  return null;
}

// A picture's thumbnail, or a video's: its first frame, in a silent player without controls (a click on it loads the
// run, as on the rest of the entry).
function thumbnail(item) {
  if (!isVideo(item)) {
    const thumb = element("img", "thumb");
    Object.assign(thumb, { src: viewUrl(item), alt: item.filename, loading: "lazy" });
    return thumb;
  }
  const thumb = element("video", "thumb");
  Object.assign(thumb, { src: viewUrl(item), title: item.filename, muted: true, preload: "metadata" });
  return thumb;
}

export class QueuePanel {
  constructor(onLoad, onError) {
    this.onLoad = onLoad; // (document, name) => void
    this.onError = onError; // (message) => void
    this.queueList = document.getElementById("queue-list");
    this.historyList = document.getElementById("history-list");
    this.timer = null;
    this.loading = null;
    this.shown = null; // what the lists show, as drawn last
    // The page shown ends just before this run, counted from the oldest (as GET /history's offset counts);
    // null: the newest page, which follows new runs.
    this.historyEnd = null;
    this.page = { start: 0, total: 0 }; // of the page shown
    document.getElementById("clear-history-button").addEventListener("click", () => {
      this.historyEnd = null;
      this.act("/history", { clear: true });
    });
    document.getElementById("history-older").addEventListener("click", () => this.showPage(this.page.start));
    document.getElementById("history-newer").addEventListener("click", () =>
      this.showPage(this.historyEnd + HISTORY_ITEMS));
  }

  showPage(end) {
    this.historyEnd = end < this.page.total ? end : null;
    this.refresh();
  }

  onMessage(type, data) {
    const ended = type === "executing" && data.node === null;
    if (type === "status" || type === "execution_start" || ended || type.startsWith("execution_")) this.refresh();
  }

  refresh() {
    if (this.timer) return;
    this.timer = setTimeout(async () => {
      await this.loading; // one request at a time; messages meanwhile schedule the next one
      this.timer = null;
      this.loading = this.load().catch((error) => this.onError(`queue panel: ${error.message}`));
    }, REFRESH_DELAY_MS);
  }

  async load() {
    const [queue, history] = await Promise.all([api("/queue"), this.loadHistory()]);
    this.render(queue, history);
  }

  async loadHistory() {
    const end = this.historyEnd;
    const query = end === null ? `max_items=${HISTORY_ITEMS}`
      : `offset=${Math.max(end - HISTORY_ITEMS, 0)}&max_items=${Math.min(end, HISTORY_ITEMS)}`;
    const { data, headers } = await request(`/history?${query}`);
    const total = Number(headers.get("X-Total-Count"));
    if (end !== null && end >= total) { // runs were deleted under this page: it is the newest one now
      this.historyEnd = null;
      return this.loadHistory();
    }
    this.page = { start: Math.max((end ?? total) - HISTORY_ITEMS, 0), total };
    return data;
  }

  async act(path, body) {
    try {
      await api(path, { method: "POST", body });
    } catch (error) {
      this.onError(`${path}: ${error.message}`);
    }
    this.refresh();
  }

  entry(queueEntry, state, detail, button) {
    const [number, promptId] = queueEntry;
    const item = element("li", `entry ${state}`);
    item.dataset.promptId = promptId;
    item.title = "click to load this workflow";
    const text = element("div", "entry-text");
    text.append(element("span", "entry-number", `#${number}`), element("span", "entry-state", state));
    if (detail) text.append(element("span", "entry-detail", detail));
    item.append(text);
    if (button) {
      const [label, title, action] = button;
      const control = element("button", "entry-action", label);
      control.title = title;
      control.addEventListener("click", (event) => {
        event.stopPropagation();
        action();
      });
      item.append(control);
    }
    item.addEventListener("click", () => this.onLoad(workflowOf(queueEntry), `#${number}`));
    return item;
  }

  render(queue, history) {
    // A refresh that changes nothing leaves the lists alone: rebuilt entries could move under a click.
    const shown = JSON.stringify([queue, history, this.page, this.historyEnd]);
    if (shown === this.shown) return;
    this.shown = shown;
    const queued = [];
    for (const q of queue.queue_running) {
      queued.push(this.entry(q, "running", "", ["■", "interrupt this run",
        () => this.act("/interrupt", { prompt_id: q[1] })]));
    }
    for (const q of queue.queue_pending) {
      queued.push(this.entry(q, "pending", "", ["✕", "remove from the queue",
        () => this.act("/queue", { delete: [q[1]] })]));
    }
    if (!queued.length) queued.push(element("li", "empty", "nothing queued"));
    this.queueList.replaceChildren(...queued);

    const done = Object.entries(history).reverse().map(([promptId, h]) => {
      const seconds = h.meta && h.meta.duration_s != null ? `${h.meta.duration_s.toFixed(1)} s` : "";
      const state = h.status.status_str || "done";
      const item = this.entry(h.prompt, state, seconds, ["✕", "delete from the history",
        () => this.act("/history", { delete: [promptId] })]);
      const error = h.meta && h.meta.error;
      if (error && error.exception_message) item.title = `${error.exception_type}: ${error.exception_message}`;
      const image = firstImage(h.outputs);
      if (image) item.prepend(thumbnail(image));
      return item;
    });
    if (!done.length) done.push(element("li", "empty", "no finished runs"));
    this.historyList.replaceChildren(...done);
    this.renderPager(Object.keys(history).length);
  }

  renderPager(shown) {
    const { start, total } = this.page;
    document.getElementById("history-pager").hidden = total <= HISTORY_ITEMS && this.historyEnd === null;
    document.getElementById("history-range").textContent = `${start + 1}–${start + shown} of ${total}`;
    document.getElementById("history-older").disabled = start === 0;
    document.getElementById("history-newer").disabled = this.historyEnd === null;
  }
}
