// The demo page: the public API only, called as any client would (same origin, no libraries).
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = ["#e01b24", "#1a5fb4", "#26a269", "#c64600", "#813d9c", "#986a44"];
let session = null; // {token, projectId}: kept in memory only, gone with the tab

function say(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

async function failure(response) {
  try {
    const body = await response.json();
    return `${body.error_code}: ${body.error_msg}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

function setUpOptions(options) {
  for (const name of ["threshold", "limit"]) {
    const input = $(name);
    input.min = options[name].minimum;
    input.max = options[name].maximum;
    input.value = options[name].default;
  }
  $("language").value = options.language.default;
}

async function signIn(event) {
  event.preventDefault();
  say("Signing in…");
  const body = {auth: {
    identity: {methods: ["password"], password: {user: {
      name: $("user").value, password: $("password").value, domain: {name: $("domain").value}}}},
    scope: {project: {name: $("project").value}},
  }};
  const response = await fetch("v3/auth/tokens?nocatalog=true", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
  $("password").value = "";
  if (!response.ok) return say(`Sign-in failed: ${await failure(response)}`, true);
  const {token} = await response.json();
  session = {token: response.headers.get("X-Subject-Token"), projectId: token.project.id};
  $("who").textContent = token.user.name;
  $("project-name").textContent = token.project.name;
  showSignedIn(true);
  say("Signed in.");
}

async function signOut() {
  const headers = {"X-Auth-Token": session.token, "X-Subject-Token": session.token};
  session = null;
  showSignedIn(false);
  const response = await fetch("v3/auth/tokens", {method: "DELETE", headers});
  say(response.ok ? "Signed out." : `Sign-out failed: ${await failure(response)}`, !response.ok);
}

function showSignedIn(signedIn) {
  $("login-form").hidden = signedIn;
  $("signed-in").hidden = !signedIn;
  (signedIn ? $("sign-out") : $("domain")).focus();
}

function fileAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function tag(event) {
  event.preventDefault();
  const file = $("file").files[0];
  const url = $("url").value.trim();
  if (!file && !url) return say("Choose or drop an image, or give its URL.", true);
  if (config.auth !== "none" && !session) return say("Sign in first.", true);
  const request = {
    language: $("language").value,
    threshold: Number($("threshold").value),
    limit: Number($("limit").value),
    ...(file ? {image: await fileAsBase64(file)} : {url}),
  };
  const headers = {"Content-Type": "application/json"};
  let path = "v2.0/image/tagging";
  if (session) {
    headers["X-Auth-Token"] = session.token;
    path = `v2/${encodeURIComponent(session.projectId)}/image/tagging`;
  }
  say("Tagging…");
  $("submit").disabled = true;
  try {
    const response = await fetch(path, {method: "POST", headers, body: JSON.stringify(request)});
    if (!response.ok) return say(`The service refused: ${await failure(response)}`, true);
    const {result} = await response.json();
    await show(file ? URL.createObjectURL(file) : url, result.tags);
    say(`${result.tags.length} tag${result.tags.length === 1 ? "" : "s"}.`);
  } catch (error) {
    say(`The service could not be reached: ${error.message}`, true);
  } finally {
    $("submit").disabled = false;
  }
}

async function show(source, tags) {
  const preview = $("preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.src = source;
  await preview.decode().catch(() => {}); // an image the browser cannot show still has its tags
  const svg = $("boxes");
  svg.setAttribute("viewBox", `0 0 ${preview.naturalWidth || 1} ${preview.naturalHeight || 1}`);
  svg.replaceChildren();
  const rows = tags.map((item, index) => {
    const colour = COLOURS[index % COLOURS.length];
    for (const instance of item.instances) svg.append(box(item.tag, colour, instance.bounding_box));
    const row = document.createElement("tr");
    for (const text of [item.tag, item.i18n_type[$("language").value], `${item.confidence} %`, item.instances.length]) {
      row.append(Object.assign(document.createElement("td"), {textContent: text}));
    }
    row.firstChild.style.color = item.instances.length ? colour : "";
    return row;
  });
  $("tags").tBodies[0].replaceChildren(...rows);
  $("results").hidden = false;
}

function box(label, colour, {top_left_x: x, top_left_y: y, width, height}) {
  const ns = "http://www.w3.org/2000/svg";
  const group = document.createElementNS(ns, "g");
  group.dataset.tag = label;
  const rect = document.createElementNS(ns, "rect");
  for (const [name, value] of Object.entries({x, y, width, height, stroke: colour})) rect.setAttribute(name, value);
  const text = document.createElementNS(ns, "text");
  for (const [name, value] of Object.entries({x: x + 4, y: y + 16, fill: colour})) text.setAttribute(name, value);
  text.textContent = label;
  group.append(rect, text);
  return group;
}

function setUpDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer.files.length) {
      $("file").files = event.dataTransfer.files;
      $("url").value = "";
    }
    say(`Chosen: ${$("file").files[0]?.name ?? "nothing"}`);
  });
  // A file and a URL together would be ambiguous: the latest choice wins.
  $("file").addEventListener("change", () => { $("url").value = ""; });
  $("url").addEventListener("input", () => { $("file").value = ""; });
}

let config;
async function start() {
  const response = await fetch("demo/config");
  if (!response.ok) return say(`The service is not answering: ${await failure(response)}`, true);
  config = await response.json();
  setUpOptions(config.options);
  $("login").hidden = config.auth === "none";
  $("open-note").hidden = config.auth !== "none";
  $("login-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("tag-form").addEventListener("submit", tag);
  setUpDropZone();
  document.body.dataset.ready = "true";
}

start();
