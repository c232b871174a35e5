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

export function showGalleryImage(src, caption) {
  const gallery = document.getElementById("gallery");
  const figure = document.createElement("a");
  figure.href = src;
  figure.target = "_blank";
  figure.className = "output-image";
  const img = document.createElement("img");
  img.src = src;
  img.alt = caption;
  img.title = caption;
  figure.append(img);
  gallery.prepend(figure);
  while (gallery.children.length > 24) gallery.lastChild.remove();
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
