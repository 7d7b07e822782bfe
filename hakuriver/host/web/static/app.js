// The live tail of a task page: one EventSource on /api/tasks/<id>/events appends new
// output to the <pre> of its stream and updates the state badge; it ends with the task.
"use strict";
(function () {
  const live = document.getElementById("live");
  if (!live || !live.dataset.follow || !window.EventSource) return;
  const out = {stdout: document.getElementById("stdout"), stderr: document.getElementById("stderr")};
  const query = new URLSearchParams({stdout: out.stdout.dataset.offset, stderr: out.stderr.dataset.offset});
  const source = new EventSource(live.dataset.follow + "?" + query);
  for (const stream of ["stdout", "stderr"]) {
    source.addEventListener(stream, (event) => {
      const pre = out[stream];
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(JSON.parse(event.data).text);
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    });
  }
  const showState = (task) => {
    const badge = document.getElementById("state");
    badge.textContent = task.state;
    badge.className = "state s-" + task.state;
    if (task.exit_code !== null && task.exit_code !== undefined) document.getElementById("exit-code").textContent = task.exit_code;
    if (task.message) document.getElementById("message").textContent = task.message;
    if (task.finished_at) {
      const finished = new Date(task.finished_at * 1000).toISOString().slice(0, 19).replace("T", " ");
      document.getElementById("finished").textContent = finished + " UTC";
    }
  };
  source.addEventListener("state", (event) => showState(JSON.parse(event.data)));
  source.addEventListener("end", (event) => {
    showState(JSON.parse(event.data));
    source.close();
    for (const button of document.querySelectorAll(".actions a")) button.remove();
  });
})();
