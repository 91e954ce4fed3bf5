/* FaCT concept atlas: renders window.FACT_ATLAS (from data.js) into #app.
 *
 * Runs from file:// (no fetch, no modules, no network). Every string from the data is put into
 * the page with textContent or setAttribute -- never parsed as markup -- so class names, concept
 * names and ids are always shown as literal text. Routes live in the URL hash:
 *   #/  (optionally #/?q=<search>)   the concept list
 *   #/concept/<id>                   one concept
 *   #/images                         the explained images
 *   #/image/<id>                     one explained image
 */
(function () {
  "use strict";

  var DATA = window.FACT_ATLAS;
  var app = document.getElementById("app");
  var PAGE = 300; // concept rows rendered at once (more on demand)

  // ------------------------------------------------------------------ DOM helpers

  function el(tag, props) {
    var node = document.createElement(tag);
    var key;
    props = props || {};
    for (key in props) {
      if (!Object.prototype.hasOwnProperty.call(props, key)) continue;
      var value = props[key];
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else node.setAttribute(key, String(value));
    }
    for (var i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }

  // append(node, child, child, ...): strings become text nodes; null/false are skipped.
  function append(node) {
    for (var i = 1; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) {
        child.forEach(function (c) { append(node, c); });
      } else if (typeof child === "string" || typeof child === "number") {
        node.appendChild(document.createTextNode(String(child)));
      } else {
        node.appendChild(child);
      }
    }
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function picture(src, alt, cls) {
    if (!src) return el("div", { class: "noimg " + (cls || ""), text: "no image" });
    var img = el("img", { src: src, alt: alt || "", loading: "lazy", decoding: "async", class: cls });
    img.addEventListener("load", function () {
      if (img.naturalWidth && img.naturalWidth <= 128) img.classList.add("pixelated");
    });
    return img;
  }

  function link(href, text, cls) {
    return el("a", { href: href, class: cls, text: text });
  }

  // ------------------------------------------------------------------ formatting

  function num(v, digits) {
    if (v === null || v === undefined) return "\u2014";
    if (typeof v !== "number") return String(v);
    var a = Math.abs(v);
    var s;
    if (v === 0) s = "0";
    else if (a >= 1e5 || a < 1e-3) s = v.toExponential(2);
    else s = String(Number(v.toPrecision(digits || 4)));
    return s.replace(/^-/, "\u2212");
  }

  function signed(v) {
    return (v >= 0 ? "+" : "") + num(v);
  }

  function percent(v) {
    return v === null || v === undefined ? "\u2014" : (100 * v).toFixed(1) + "%";
  }

  function errorText(v) {
    return v === 0 ? "0" : v.toExponential(1);
  }

  // ------------------------------------------------------------------ indices

  var conceptById = new Map();
  var layerOrder = new Map();
  var explanationById = new Map();
  var usedIn = new Map(); // concept id -> [{explanation, value}]
  if (DATA) {
    DATA.layers.forEach(function (l, i) { layerOrder.set(l.name, i); });
    DATA.concepts.forEach(function (c) { conceptById.set(c.id, c); });
    DATA.explanations.forEach(function (e) {
      explanationById.set(e.id, e);
      e.contributions.forEach(function (k) {
        if (!usedIn.has(k.concept)) usedIn.set(k.concept, []);
        usedIn.get(k.concept).push({ explanation: e, value: k.value });
      });
    });
  }

  function conceptHref(id) { return "#/concept/" + encodeURIComponent(id); }
  function imageHref(id) { return "#/image/" + encodeURIComponent(id); }
  function conceptTitle(c) { return c.name ? c.name : c.layer + " #" + c.index; }

  function searchText(c) {
    var parts = [c.id, c.name || "", c.layer].concat(c.top_classes);
    c.top_images.forEach(function (t) { parts.push(t.label); });
    return parts.join("\n").toLowerCase();
  }
  var haystack = new Map();
  if (DATA) DATA.concepts.forEach(function (c) { haystack.set(c.id, searchText(c)); });

  // ------------------------------------------------------------------ concept list

  var SORTS = [
    ["frequency", "frequency"],
    ["c2", "C2-score"],
    ["entropy", "class entropy"],
    ["spatial_extent", "spatial extent"],
    ["index", "index"],
  ];
  var state = { q: "", sort: "frequency", desc: true, layer: "", limit: PAGE };

  function filteredConcepts() {
    var tokens = state.q.toLowerCase().split(/\s+/).filter(Boolean);
    var rows = DATA.concepts.filter(function (c) {
      if (state.layer && c.layer !== state.layer) return false;
      var text = haystack.get(c.id);
      return tokens.every(function (t) { return text.indexOf(t) >= 0; });
    });
    var key = state.sort;
    var sign = state.desc ? -1 : 1;
    rows.sort(function (a, b) {
      var va = a[key], vb = b[key];
      var na = va === null || va === undefined, nb = vb === null || vb === undefined;
      if (na !== nb) return na ? 1 : -1; // missing values last, whatever the direction
      if (!na && va !== vb) return sign * (va < vb ? -1 : 1);
      var la = layerOrder.get(a.layer), lb = layerOrder.get(b.layer);
      return la !== lb ? la - lb : a.index - b.index;
    });
    return rows;
  }

  function conceptRow(c) {
    var classes = el("div", { class: "chips" });
    c.top_classes.slice(0, 4).forEach(function (name) {
      append(classes, el("span", { class: "chip", text: name }));
    });
    return el("tr", { class: "concept-row", "data-id": c.id },
      el("td", { class: "thumb-cell" },
        el("a", { href: conceptHref(c.id), tabindex: "-1" }, picture(c.thumb, conceptTitle(c), "thumb"))),
      el("td", null,
        link(conceptHref(c.id), conceptTitle(c), "concept-link"),
        el("div", { class: "muted small", text: c.id })),
      el("td", { text: c.layer }),
      el("td", { class: "num", text: percent(c.frequency) }),
      el("td", { class: "num", text: num(c.c2, 3) }),
      el("td", { class: "num", text: num(c.entropy, 3) }),
      el("td", { class: "num", text: num(c.spatial_extent, 3) }),
      el("td", null, classes));
  }

  function renderConceptTable(tbody, count, more) {
    var rows = filteredConcepts();
    clear(tbody);
    rows.slice(0, state.limit).forEach(function (c) { tbody.appendChild(conceptRow(c)); });
    count.textContent = rows.length + " of " + DATA.concepts.length + " concepts";
    more.hidden = rows.length <= state.limit;
    more.textContent = "Show " + Math.min(PAGE, rows.length - state.limit) + " more";
  }

  function summaryBlock() {
    var box = el("section", { class: "summary" });
    var stats = [
      ["concepts", String(DATA.concepts.length)],
      ["layers", DATA.layers.map(function (l) { return l.name; }).join(", ") || "\u2014"],
      ["classes", String(DATA.classes.length)],
      ["explained images", String(DATA.explanations.length)],
    ];
    DATA.summary.forEach(function (kv) {
      var v = kv[1];
      stats.push([kv[0], typeof v === "number" ? num(v) : v === null ? "\u2014" : String(v)]);
    });
    stats.forEach(function (kv) {
      append(box, el("div", { class: "stat" },
        el("div", { class: "stat-value", text: kv[1] }),
        el("div", { class: "stat-label", text: kv[0] })));
    });
    return box;
  }

  function viewConcepts(params) {
    if (params.has("q")) state.q = params.get("q");
    if (params.has("layer")) state.layer = params.get("layer");
    state.limit = PAGE;
    document.title = DATA.title;
    var head = el("section", { class: "intro" },
      el("h1", { text: DATA.title }),
      DATA.subtitle ? el("p", { class: "lead", text: DATA.subtitle }) : null);
    var search = el("input", {
      type: "search", id: "search", placeholder: "Search concepts by id, name or class\u2026",
      "aria-label": "search concepts", autocomplete: "off", spellcheck: "false",
    });
    search.value = state.q;
    var sort = el("select", { id: "sort", "aria-label": "sort by" });
    SORTS.forEach(function (s) {
      var opt = el("option", { value: s[0], text: "sort by " + s[1] });
      if (s[0] === state.sort) opt.selected = true;
      sort.appendChild(opt);
    });
    var order = el("button", { id: "order", type: "button", class: "button" });
    var layer = el("select", { id: "layer", "aria-label": "layer" },
      el("option", { value: "", text: "all layers" }));
    DATA.layers.forEach(function (l) {
      var opt = el("option", { value: l.name, text: l.name + " (" + l.n_concepts + " concepts)" });
      if (l.name === state.layer) opt.selected = true;
      layer.appendChild(opt);
    });
    var count = el("span", { id: "count", class: "muted" });
    var tbody = el("tbody", { id: "concept-rows" });
    var more = el("button", { id: "more", type: "button", class: "button" });
    var table = el("table", { class: "concepts" },
      el("thead", null, el("tr", null,
        el("th", null, ""), el("th", { text: "concept" }), el("th", { text: "layer" }),
        el("th", { class: "num", text: "frequency" }), el("th", { class: "num", text: "C2" }),
        el("th", { class: "num", text: "entropy" }), el("th", { class: "num", text: "spatial extent" }),
        el("th", { text: "top classes" }))),
      tbody);

    function update() {
      order.textContent = state.desc ? "\u2193 descending" : "\u2191 ascending";
      renderConceptTable(tbody, count, more);
    }
    search.addEventListener("input", function () { state.q = search.value; state.limit = PAGE; update(); });
    sort.addEventListener("change", function () { state.sort = sort.value; update(); });
    layer.addEventListener("change", function () { state.layer = layer.value; state.limit = PAGE; update(); });
    order.addEventListener("click", function () { state.desc = !state.desc; update(); });
    more.addEventListener("click", function () { state.limit += PAGE; update(); });

    append(app, head, summaryBlock(),
      el("section", { class: "panel" },
        el("div", { class: "toolbar" }, search, sort, order, DATA.layers.length > 1 ? layer : null, count),
        el("div", { class: "table-wrap" }, table),
        more));
    update();
  }

  // ------------------------------------------------------------------ concept page

  function statsTable(pairs) {
    var dl = el("dl", { class: "facts" });
    pairs.forEach(function (kv) {
      append(dl, el("dt", { text: kv[0] }), el("dd", { text: kv[1] }));
    });
    return dl;
  }

  function viewConcept(id) {
    var c = conceptById.get(id);
    if (!c) return notFound("No concept with id \u201c" + id + "\u201d.");
    document.title = conceptTitle(c) + " \u00b7 " + DATA.title;
    var sameLayer = DATA.concepts.filter(function (x) { return x.layer === c.layer; })
      .sort(function (a, b) { return a.index - b.index; });
    var pos = sameLayer.indexOf(c);
    var prev = sameLayer[pos - 1], next = sameLayer[pos + 1];
    var pairs = [
      ["id", c.id], ["layer", c.layer], ["index", String(c.index)],
      ["frequency", percent(c.frequency)], ["C2-score", num(c.c2, 3)],
      ["class entropy", num(c.entropy, 3)], ["spatial extent", num(c.spatial_extent, 3)],
    ];
    c.extra.forEach(function (kv) { pairs.push([kv[0], typeof kv[1] === "number" ? num(kv[1]) : kv[1]]); });
    var chips = el("div", { class: "chips" });
    c.top_classes.forEach(function (name) {
      append(chips, link("#/?q=" + encodeURIComponent(name), name, "chip"));
    });

    var grid = el("div", { class: "tiles", id: "top-images" });
    c.top_images.forEach(function (t, i) {
      append(grid, el("figure", { class: "tile" },
        el("div", { class: "pair" },
          picture(t.image, t.label, "tile-img"),
          t.overlay ? el("div", { class: "on-black" }, picture(t.overlay, "attribution", "tile-img")) : null),
        el("figcaption", null,
          el("span", { class: "label", text: t.label }),
          el("span", { class: "muted", text: "presence " + num(t.presence, 3) }))));
    });

    var uses = (usedIn.get(c.id) || []).slice().sort(function (a, b) {
      return Math.abs(b.value) - Math.abs(a.value);
    });
    var usesList = el("div", { class: "tiles small-tiles", id: "used-in" });
    uses.forEach(function (u) {
      var e = u.explanation;
      append(usesList, el("a", { class: "tile tile-link image-link", href: imageHref(e.id) },
        picture(e.image, e.label, "tile-img"),
        el("div", { class: "caption" },
          el("span", { class: "label", text: e.id }),
          el("span", { class: u.value >= 0 ? "pos" : "neg", text: signed(u.value) }))));
    });

    append(app,
      el("nav", { class: "crumbs" }, link("#/", "Concepts"), " / ", c.layer, " / ", "#" + c.index),
      el("div", { class: "title-row" },
        el("h1", { id: "concept-title", text: conceptTitle(c) }),
        el("div", { class: "pager" },
          prev ? link(conceptHref(prev.id), "\u2190 " + conceptTitle(prev), "button") : null,
          next ? link(conceptHref(next.id), conceptTitle(next) + " \u2192", "button") : null)),
      el("div", { class: "columns" },
        el("section", { class: "panel side" }, el("h2", { text: "Statistics" }), statsTable(pairs),
          c.top_classes.length ? el("h2", { text: "Top classes" }) : null,
          c.top_classes.length ? chips : null),
        c.card ? el("section", { class: "panel main" }, el("h2", { text: "Concept card" }),
          picture(c.card, "concept card of " + conceptTitle(c), "card")) : null),
      c.top_images.length ? el("section", { class: "panel" },
        el("h2", { text: "Top-activating images" }),
        el("p", { class: "muted small", text: "Each image with the concept\u2019s B-cos input attribution (on black), its class and the concept\u2019s presence." }),
        grid) : null,
      uses.length ? el("section", { class: "panel" },
        el("h2", { text: "Contributes to " + uses.length + " explained image" + (uses.length > 1 ? "s" : "") }),
        usesList) : null);
  }

  // ------------------------------------------------------------------ explained images

  var imageState = { filter: "all" };

  function viewImages() {
    document.title = "Explained images \u00b7 " + DATA.title;
    var filter = el("select", { id: "image-filter", "aria-label": "filter" });
    [["all", "all images"], ["correct", "correctly classified"], ["wrong", "misclassified"]].forEach(function (f) {
      var opt = el("option", { value: f[0], text: f[1] });
      if (f[0] === imageState.filter) opt.selected = true;
      filter.appendChild(opt);
    });
    var grid = el("div", { class: "tiles", id: "image-list" });
    function update() {
      clear(grid);
      DATA.explanations.forEach(function (e) {
        if (imageState.filter === "correct" && !e.correct) return;
        if (imageState.filter === "wrong" && e.correct) return;
        append(grid, el("a", { class: "tile tile-link image-link", href: imageHref(e.id) },
          el("div", { class: "pair" }, picture(e.image, e.label, "tile-img"),
            e.overlay ? el("div", { class: "on-black" }, picture(e.overlay, "explanation", "tile-img")) : null),
          el("div", { class: "caption" },
            el("span", { class: "label", text: e.id }),
            el("span", { class: e.correct ? "badge ok" : "badge bad", text: e.correct ? "correct" : "misclassified" })),
          el("div", { class: "caption muted small" },
            el("span", { text: e.label + " \u2192 " + e.predicted }),
            el("span", { text: "logit " + num(e.logit) }))));
      });
      if (!grid.firstChild) append(grid, el("p", { class: "muted", text: "No images." }));
    }
    filter.addEventListener("change", function () { imageState.filter = filter.value; update(); });
    append(app,
      el("h1", { text: "Explained images" }),
      el("p", { class: "lead", text: "Every decision is split exactly into concept contributions plus the logit bias." }),
      el("section", { class: "panel" }, el("div", { class: "toolbar" }, filter), grid));
    update();
  }

  function contributionRow(rank, thumb, label, href, value, scale) {
    var width = scale > 0 ? Math.min(100, 100 * Math.abs(value) / scale) : 0;
    var bar = el("div", { class: "bar " + (value >= 0 ? "pos-bar" : "neg-bar") });
    bar.style.width = width.toFixed(1) + "%";
    return el("tr", { class: href ? "contrib-row" : "contrib-row rest" },
      el("td", { class: "muted num", text: rank }),
      el("td", { class: "thumb-cell" }, thumb),
      el("td", null, href ? link(href, label, "concept-link") : el("span", { text: label })),
      el("td", { class: "num " + (value >= 0 ? "pos" : "neg"), text: signed(value) }),
      el("td", { class: "bar-cell" }, el("div", { class: "bar-track" }, bar)));
  }

  function viewImage(id) {
    var e = explanationById.get(id);
    if (!e) return notFound("No explained image with id \u201c" + id + "\u201d.");
    document.title = e.id + " \u00b7 " + DATA.title;
    var pos = DATA.explanations.indexOf(e);
    var prev = DATA.explanations[pos - 1], next = DATA.explanations[pos + 1];
    var total = e.contributions.reduce(function (s, k) { return s + k.value; }, 0) + (e.other || 0);
    var scale = Math.max.apply(null, e.contributions.map(function (k) { return Math.abs(k.value); })
      .concat([Math.abs(e.other || 0), Math.abs(e.bias), 1e-12]));
    var tbody = el("tbody", { id: "contributions" });
    var ranked = e.contributions.slice().sort(function (a, b) { return Math.abs(b.value) - Math.abs(a.value); });
    ranked.forEach(function (k, i) {
      var c = conceptById.get(k.concept);
      var thumb = picture(k.overlay || c.thumb, conceptTitle(c), "thumb" + (k.overlay ? " on-black" : ""));
      append(tbody, contributionRow(String(i + 1), thumb, conceptTitle(c) + " (" + c.id + ")",
        conceptHref(c.id), k.value, scale));
    });
    if (e.other !== null && e.other !== undefined) {
      append(tbody, contributionRow("", null, "other concepts", null, e.other, scale));
    }
    append(tbody, contributionRow("", null, "bias", null, e.bias, scale));

    append(app,
      el("nav", { class: "crumbs" }, link("#/images", "Explained images"), " / ", e.id),
      el("div", { class: "title-row" },
        el("h1", { id: "image-title" }, e.id + " ",
          el("span", { class: e.correct ? "badge ok" : "badge bad", text: e.correct ? "correct" : "misclassified" })),
        el("div", { class: "pager" },
          prev ? link(imageHref(prev.id), "\u2190 " + prev.id, "button") : null,
          next ? link(imageHref(next.id), next.id + " \u2192", "button") : null)),
      el("div", { class: "columns" },
        el("section", { class: "panel side" },
          el("div", { class: "pair big" },
            picture(e.image, e.label, "tile-img"),
            e.overlay ? el("div", { class: "on-black" }, picture(e.overlay, "explanation", "tile-img")) : null),
          statsTable([
            ["true class", e.label], ["predicted", e.predicted], ["layer", e.layer],
            ["logit", num(e.logit, 6)], ["\u03a3 contributions", num(total, 6)],
            ["bias", num(e.bias, 6)], ["completeness error", errorText(e.completeness_error)],
          ])),
        el("section", { class: "panel main" },
          el("h2", { text: "Concept contributions to \u201c" + e.predicted + "\u201d" }),
          el("p", { class: "muted small", id: "completeness",
            text: "logit " + num(e.logit, 6) + " = \u03a3 contributions " + num(total, 6) +
              " + bias " + num(e.bias, 6) + "; completeness error " + errorText(e.completeness_error) }),
          el("table", { class: "contribs" }, tbody))),
      e.figure ? el("section", { class: "panel" }, el("h2", { text: "Explanation figure" }),
        picture(e.figure, "explanation of " + e.id, "card")) : null);
  }

  // ------------------------------------------------------------------ router

  function notFound(message) {
    append(app, el("h1", { text: "Not found" }), el("p", { class: "notice", text: message }),
      el("p", null, link("#/", "Back to the concepts")));
  }

  function route() {
    clear(app);
    if (!DATA) {
      append(app, el("p", { class: "notice", text: "data.js is missing or failed to load; rebuild the atlas." }));
      return;
    }
    var hash = location.hash.replace(/^#\/?/, "");
    var slash = hash.indexOf("/");
    var head = slash < 0 ? hash : hash.slice(0, slash);
    var rest = slash < 0 ? "" : hash.slice(slash + 1);
    var decoded;
    try { decoded = decodeURIComponent(rest); } catch (err) { decoded = rest; }
    var nav = "concepts";
    if (head === "" || head.charAt(0) === "?") {
      viewConcepts(new URLSearchParams(head.slice(1)));
    } else if (head === "concept") {
      viewConcept(decoded);
    } else if (head === "images") {
      nav = "images";
      viewImages();
    } else if (head === "image") {
      nav = "images";
      viewImage(decoded);
    } else {
      notFound("There is no page \u201c" + hash + "\u201d.");
    }
    document.querySelectorAll("[data-nav]").forEach(function (a) {
      a.classList.toggle("active", a.getAttribute("data-nav") === nav);
    });
    window.scrollTo(0, 0);
  }

  if (DATA) {
    var brand = document.getElementById("site-title");
    if (brand) brand.textContent = DATA.title;
  }
  window.addEventListener("hashchange", route);
  route();
})();
