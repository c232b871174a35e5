// The panels around the canvas: the searchable node library, the output gallery, messages.

export function buildLibrary(objectInfo, onPick) {
  const list = document.getElementById("library-list");
  const search = document.getElementById("library-search");
  const byCategory = {};
  for (const [name, def] of Object.entries(objectInfo)) {
    (byCategory[def.category || "misc"] ||= []).push({ name, title: def.display_name || name, def });
  }
  function render() {
    const query = search.value.trim().toLowerCase();
    list.replaceChildren();
    for (const category of Object.keys(byCategory).sort()) {
      const items = byCategory[category]
        .filter((n) => !query || `${n.name} ${n.title} ${category}`.toLowerCase().includes(query))
        .sort((a, b) => a.title.localeCompare(b.title));
      if (!items.length) continue;
      const group = document.createElement("details");
      group.open = Boolean(query) || Object.keys(byCategory).length < 8;
      const summary = document.createElement("summary");
      summary.textContent = `${category} (${items.length})`;
      group.append(summary);
      for (const item of items) {
        const button = document.createElement("button");
        button.className = "library-item";
        button.dataset.type = item.name;
        button.textContent = item.title;
        button.title = item.def.description || item.name;
        button.onclick = () => onPick(item.name);
        group.append(button);
      }
      list.append(group);
    }
  }
  search.oninput = render;
  search.onkeydown = (event) => {
    const first = list.querySelector(".library-item");
    if (event.key === "Enter" && first) first.click();
  };
  render();
}

const GALLERY_ITEMS = 24; // the newest results the gallery strip keeps

// A result in the gallery strip, linking to its file: a picture, or a video as a small silent player that loops.
function showInGallery(src, media) {
  const gallery = document.getElementById("gallery");
  const link = Object.assign(document.createElement("a"), { href: src, target: "_blank", className: "output-image" });
  link.append(media);
  gallery.prepend(link);
  while (gallery.children.length > GALLERY_ITEMS) gallery.lastChild.remove();
}

export function showGalleryImage(src, caption) {
  showInGallery(src, Object.assign(document.createElement("img"), { src, alt: caption, title: caption }));
}

export function showGalleryVideo(src, caption) {
  const video = document.createElement("video");
  Object.assign(video, { src, title: caption, muted: true, loop: true, autoplay: true, playsInline: true });
  showInGallery(src, video);
}

export function toast(message, kind = "info", ms = 6000) {
  const box = document.createElement("div");
  box.className = `toast ${kind}`;
  box.textContent = message;
  box.onclick = () => box.remove();
  document.getElementById("toasts").append(box);
  if (ms) setTimeout(() => box.remove(), ms);
}

export function setStatus(text) {
  document.getElementById("status").textContent = text;
}
