"""The `releasegate` command: gateway, keys, signing, audit, traffic and the demo."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

_Command = TypeVar("_Command", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """releasegate: validate, sign, shadow, canary, promote or roll back MLflow models."""


# --- serving -------------------------------------------------------------------------------


@main.group()
def gateway() -> None:
    """The model gateway (the embedded serving plane)."""


@gateway.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=int)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Server certificate (PEM): serve HTTPS. Default: $RELEASEGATE_GATEWAY_TLS_CERT.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The certificate's private key (PEM). Default: $RELEASEGATE_GATEWAY_TLS_KEY.",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Mutual TLS: refuse clients without a certificate signed by this CA. "
    "Default: $RELEASEGATE_GATEWAY_TLS_CLIENT_CA.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Gateway processes behind the one port. Default: $RELEASEGATE_GATEWAY_WORKERS, else one per core.",
)
def gateway_serve(
    host: str, port: int, tls_cert: str | None, tls_key: str | None, tls_client_ca: str | None, workers: int | None
) -> None:
    """Serve the models in the routes table, verifying each signature before it loads."""
    from pydantic import ValidationError

    from releasegate import serving

    try:
        serving.run(
            host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca, workers=workers
        )
    except ValidationError as err:
        raise click.UsageError(str(err)) from None


@main.group()
def apikeys() -> None:
    """API keys for the gateway (roles: predict, feedback, admin)."""


@main.group()
def routes() -> None:
    """A model's traffic split on its serving platform (the gateway, or KServe by the model's tag)."""


@routes.command("set")
@click.argument("model")
@click.option("--champion", "champion", required=True, help="The version that answers the model's traffic.")
def routes_set(model: str, champion: str) -> None:
    """Serve MODEL's champion: the first route of a model (releases move it after that); verified before it serves."""
    from releasegate import pipeline, registry
    from releasegate.errors import DeploymentError

    try:
        version = registry.resolve_version(model, champion)
        applied = pipeline.serve_champion(model, version)
    except (registry.RegistryError, DeploymentError) as err:
        click.echo(f"REFUSED: {err}", err=True)
        sys.exit(1)
    click.echo(f"{model}: all traffic to v{applied.champion_version}")


@routes.command("show")
@click.argument("model")
def routes_show(model: str) -> None:
    """Print MODEL's current split as JSON."""
    from releasegate import pipeline

    applied = pipeline.current_route(model)
    click.echo(json.dumps(applied.model_dump(mode="json") if applied else None))


@apikeys.command("create")
@click.option("--role", type=click.Choice(["predict", "feedback", "alerts", "admin"]), required=True)
def apikeys_create(role: str) -> None:
    """Create a key; the secret is printed once and stored only as a digest."""
    from releasegate.serving import auth

    key_id, secret = auth.create_key(role)
    click.echo(json.dumps({"key_id": key_id, "role": role, "key": secret}))


@apikeys.command("revoke")
@click.argument("key_id")
def apikeys_revoke(key_id: str) -> None:
    """Revoke a key; gateways stop accepting it within their poll interval."""
    from releasegate.serving import auth

    auth.revoke_key(key_id)
    click.echo(f"revoked {key_id}")


# --- signing -------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Signing keys (elliptic curve P-256)."""


@keys.command("generate")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory for the key pair (default: $RELEASEGATE_HOME/keys).",
)
@click.option("--name", default="release", show_default=True)
def keys_generate(out_dir: Path | None, name: str) -> None:
    """Generate a signing key pair; the public key goes into RELEASEGATE_TRUSTED_KEYS."""
    from releasegate import signing
    from releasegate.settings import get_settings

    private, public = signing.generate_keys(out_dir or get_settings().signing_key.parent, name=name)
    click.echo(f"private key: {private}\npublic key:  {public}")


def _model_ref(ref: str) -> tuple[str, str]:
    body = ref.removeprefix("models:/")
    if "/" not in body and "@" not in body:
        raise click.BadParameter(f"{ref!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    name, _, version = body.partition("@") if "@" in body else body.rpartition("/")
    return name, version


@main.command()
@click.argument("model_uri")
@click.option(
    "--private-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The signing key (PEM, elliptic curve). Default: $RELEASEGATE_SIGNING_KEY.",
)
@click.option(
    "--signing-certificate",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Sign in certificate mode: the key's X.509 certificate (PEM), issued for code signing. "
    "Default: $RELEASEGATE_SIGNING_CERTIFICATE.",
)
@click.option(
    "--certificate-chain",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    multiple=True,
    help="For the signing certificate: the issuing CA's certificate and any intermediates (PEM; repeatable). "
    "Default: $RELEASEGATE_SIGNING_CERTIFICATE_CHAIN.",
)
def sign(
    model_uri: str,
    private_key: Path | None,
    signing_certificate: Path | None,
    certificate_chain: tuple[Path, ...],
) -> None:
    """Sign a registered version (models:/NAME/VERSION) where it is built; an already signed one is verified instead.

    It must then verify with this machine's trust (RELEASEGATE_TRUSTED_KEYS, or RELEASEGATE_TRUSTED_CA
    for a certificate): the deployment's. Exit 1 if refused.
    """
    from releasegate import registry, signing
    from releasegate.settings import get_settings

    overrides: dict[str, object] = {}
    if private_key:
        overrides["signing_key"] = private_key.resolve()
    if signing_certificate:
        overrides["signing_certificate"] = signing_certificate.resolve()
    if certificate_chain:
        overrides["signing_certificate_chain"] = [path.resolve() for path in certificate_chain]
    settings = get_settings().model_copy(update=overrides)
    name, version = _model_ref(model_uri)
    try:
        version = registry.resolve_version(name, version, settings=settings)
        digest = signing.sign_version(name, version, settings)
    except (signing.SignatureError, registry.RegistryError) as err:
        click.echo(f"REFUSED: {err}", err=True)
        sys.exit(1)
    click.echo(f"{name} v{version} signed: {digest}")


@main.command()
@click.argument("model_uri")
def verify(model_uri: str) -> None:
    """Verify a version's signature against the trusted keys, or a certificate against the trusted CA (exit 1 if not)."""
    from releasegate import registry, signing

    name, version = _model_ref(model_uri)
    try:
        verified = signing.fetch_verified(name, version)
    except (signing.SignatureError, registry.RegistryError) as err:
        click.echo(f"REFUSED: {err}", err=True)
        sys.exit(1)
    verified.remove()
    click.echo(f"OK: {name} v{verified.version} verified (bundle {verified.digest})")


@main.command()
@click.argument("model_uri")
@click.option(
    "--policy",
    default="default",
    show_default=True,
    help="The policy the release would run under (a name on the policy search path).",
)
def check(model_uri: str, policy: str) -> None:
    """Say what a version lacks for a release (signature, artifacts, label, contract, policy); exit 1 on a problem."""
    from releasegate import checks

    name, version = _model_ref(model_uri)
    report = checks.check_version(name, version, policy)
    click.echo(f"releasegate check models:/{report.model}/{report.version} (policy {report.policy})")
    for finding in report.findings:
        click.echo(f"  {finding.level.value:8s}{finding.topic:10s} {finding.message}")
    errors = len(report.errors)
    click.echo(
        f"{errors} problem(s): a release would be rejected or could not run" if errors else "ready for a release"
    )
    sys.exit(1 if errors else 0)


@main.command("settings")
@click.option(
    "--markdown", is_flag=True, help="Every variable with its default and meaning, as docs/operations.md lists them."
)
def settings_show(markdown: bool) -> None:
    """The settings this environment gives (secrets masked), or with --markdown the table of every variable."""
    from releasegate.settings import get_settings, markdown_table

    if markdown:
        click.echo(markdown_table())
        return
    values = get_settings().model_dump(mode="json")
    for secret in ("admin_api_key", "apikey_pepper"):
        if values.get(secret):
            values[secret] = "***"
    click.echo(json.dumps(values, indent=2))


# --- releases and audit ----------------------------------------------------------------------


@main.group()
def audit() -> None:
    """The hash-chained audit log."""


@audit.command("verify")
def audit_verify() -> None:
    """Recompute the chain and check it against the signed head anchored outside the database.

    Exit 1 naming the first failure: an event missing, edited, re-linked or reordered; the last
    events deleted (truncated); the log rewritten; events no key holder signed; the head missing or forged.
    """
    from releasegate import audit as audit_log

    report = audit_log.verify()
    if report.ok:
        click.echo(f"OK: {report.message}")
        sys.exit(0)
    failure = report.failure.value if report.failure else "broken"
    click.echo(f"BROKEN ({failure}): {report.message}")
    sys.exit(1)


@audit.command("show")
@click.option("--release", "release_id", default=None)
@click.option("--model", default=None)
def audit_show(release_id: str | None, model: str | None) -> None:
    """Print the events (JSON lines)."""
    from releasegate import audit as audit_log

    for event in audit_log.events(release_id=release_id, model=model):
        click.echo(json.dumps(event, default=str))


@main.command("plan")
@click.option("--model", default=None, help="Read the model's traffic rate from its prediction log (last hour).")
@click.option("--rps", type=float, default=None, help="Requests per second instead of the log's rate.")
@click.option("--metric", "kind", type=click.Choice(["proportion", "mean"]), default="proportion", show_default=True)
@click.option("--baseline", type=float, required=True, help="The control's proportion (e.g. 0.05) or mean.")
@click.option("--sd", type=float, default=None, help="The metric's standard deviation (a mean's).")
@click.option("--mde", type=float, required=True, help="Minimum detectable effect, in the metric's units.")
@click.option("--relative", is_flag=True, help="--mde is relative to the baseline (0.05: 5 %).")
@click.option("--alpha", type=float, default=0.05, show_default=True)
@click.option("--power", type=float, default=0.8, show_default=True)
@click.option("--weights", default="50,50", show_default=True, help="Traffic shares of the arms, the control first.")
def plan_command(
    model: str | None,
    rps: float | None,
    kind: str,
    baseline: float,
    sd: float | None,
    mde: float,
    relative: bool,
    alpha: float,
    power: float,
    weights: str,
) -> None:
    """Requests and time a comparison needs: fixed-horizon and sequential (always-valid) designs."""
    from pydantic import ValidationError

    from releasegate import planning

    try:
        design = planning.Design(
            kind=planning.MetricKind(kind),
            baseline=baseline,
            sd=sd,
            mde=mde * abs(baseline) if relative else mde,
            alpha=alpha,
            power=power,
            weights=[float(w) for w in weights.split(",")],
        )
    except (ValidationError, ValueError) as err:
        why = "; ".join(e["msg"] for e in err.errors()) if isinstance(err, ValidationError) else str(err)
        raise click.UsageError(why) from None
    if rps is None and model:
        rps = planning.traffic_rate(model)
        if rps is None:
            click.echo(f"{model} has no logged requests in the last hour: durations need --rps", err=True)
    result = planning.plan(design, rps)

    def line(what: str, requests: int) -> str:
        seconds = result.seconds(requests)
        when = f"  ≈ {seconds / 3600:.1f} h at {rps:.1f} requests/s" if seconds is not None and rps else ""
        return f"  {what:<44}{requests:>12,} requests{when}"

    k = len(design.weights)
    click.echo(
        f"{k} arms (shares {', '.join(f'{w:.0%}' for w in design.weights)}), {kind} {baseline:g}, "
        f"effect {design.mde:+g}, alpha {alpha:g} (each of {k - 1} comparisons: {design.alpha_each:.4g}), "
        f"power {power:g}"
    )
    click.echo(line("fixed horizon (one look)", result.fixed_requests))
    click.echo(line(f"sequential, decided with probability {power:g}", result.sequential_requests))
    click.echo(line("sequential, median", result.sequential_median_requests))


@main.command("releases")
@click.option("--model", default=None)
def releases_list(model: str | None) -> None:
    """List releases, newest first."""
    from releasegate import release

    for rel in release.list_releases(model):
        click.echo(
            f"{rel.release_id}  {rel.model} v{rel.candidate_version} (champion v{rel.champion_version})  "
            f"{rel.state.value:12s}  {rel.reasons[-1] if rel.reasons else ''}"
        )


@main.command()
@click.argument("release_id")
@click.option("--reason", required=True, help="Why the release is stopped (recorded in the audit log).")
@click.option("--actor", default="cli", show_default=True)
def abort(release_id: str, reason: str, actor: str) -> None:
    """Stop a release now: traffic back to the champion, state `aborted`."""
    from releasegate import pipeline

    click.echo(json.dumps(pipeline.abort(release_id, reason=reason, actor=actor)))


@main.command("purge")
@click.option("--no-reports", is_flag=True, help="Only the database: leave the nightly reports in MLflow.")
@click.option("--actor", default="cli", show_default=True)
def purge_command(no_reports: bool, actor: str) -> None:
    """Delete predictions, feedback and nightly reports past each model's retention (what the nightly run does)."""
    from releasegate import retention

    try:
        purged = retention.purge(actor=actor, reports=not no_reports)
    except retention.RetentionError as err:
        raise click.ClickException(str(err)) from None
    for done in purged:
        click.echo(
            f"{done.model}: {done.predictions} predictions, {done.feedback} feedback rows, "
            f"{len(done.reports)} nightly reports deleted"
        )


# Who moves an incident: a person, by default the shell's user.
_person = click.option("--actor", default=lambda: os.environ.get("USER", "cli"), show_default="$USER")


@main.group("incidents")
def incidents_group() -> None:
    """Incidents: opened by rollbacks, failed or invalid releases, emergency rollbacks and alarms; owned, resolved
    and closed here (every move audited and sent to RELEASEGATE_INCIDENT_WEBHOOK)."""


@incidents_group.command("list")
@click.option("--state", type=click.Choice(["open", "acknowledged", "resolved", "closed"]), default=None)
@click.option("--model", default=None)
def incidents_list(state: str | None, model: str | None) -> None:
    """Incidents, newest first."""
    from datetime import UTC, datetime

    from releasegate import incidents

    found = incidents.list_incidents(incidents.IncidentState(state) if state else None, model)
    for i in found:
        opened = datetime.fromtimestamp(i.opened_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        owner = f"  owner {i.owner}" if i.owner else ""
        click.echo(f"#{i.id}  {opened}  {i.state.value:12s} {i.severity.value:8s} {i.title}{owner}")
    if not found:
        click.echo("no incidents")


@incidents_group.command("show")
@click.argument("incident_id", type=int)
def incidents_show(incident_id: int) -> None:
    """One incident with its timeline (JSON)."""
    from releasegate import incidents

    try:
        click.echo(incidents.get(incident_id).model_dump_json(indent=2))
    except incidents.IncidentError as err:
        raise click.ClickException(str(err)) from None


def _move(
    incident_id: int,
    to: str,
    actor: str,
    note: str = "",
    owner: str | None = None,
    resolution: str | None = None,
    review_url: str | None = None,
) -> None:
    from releasegate import incidents

    try:
        moved = incidents.move(
            incident_id,
            incidents.IncidentState(to),
            actor=actor,
            note=note,
            owner=owner,
            resolution=resolution,
            review_url=review_url,
        )
    except incidents.IncidentError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"#{moved.id} {moved.state.value}: {moved.title}")


@incidents_group.command("ack")
@click.argument("incident_id", type=int)
@click.option("--owner", default=None, help="Who owns it from now (default: the actor).")
@click.option("--note", default="")
@_person
def incidents_ack(incident_id: int, owner: str | None, note: str, actor: str) -> None:
    """Acknowledge an open incident: someone owns it."""
    _move(incident_id, "acknowledged", actor, owner=owner, note=note)


@incidents_group.command("resolve")
@click.argument("incident_id", type=int)
@click.option("--resolution", required=True, help="What was done (kept in the incident and the audit log).")
@_person
def incidents_resolve(incident_id: int, resolution: str, actor: str) -> None:
    """Resolve an incident: service restored, the cause dealt with."""
    _move(incident_id, "resolved", actor, resolution=resolution)


@incidents_group.command("close")
@click.argument("incident_id", type=int)
@click.option("--review", "review_url", default=None, help="Link to the post-incident review.")
@_person
def incidents_close(incident_id: int, review_url: str | None, actor: str) -> None:
    """Close a resolved incident, with its post-incident review."""
    _move(incident_id, "closed", actor, review_url=review_url)


@incidents_group.command("reopen")
@click.argument("incident_id", type=int)
@click.option("--note", required=True, help="Why it is not over.")
@_person
def incidents_reopen(incident_id: int, note: str, actor: str) -> None:
    """Reopen a resolved incident."""
    _move(incident_id, "open", actor, note=note)


@main.group()
def subject() -> None:
    """Data-subject requests: export or erase every logged row of one person (by their routing key)."""


def _subject_options(command: _Command) -> _Command:
    for option in reversed(
        [
            click.option(
                "--key",
                prompt="Subject's routing key",
                hide_input=True,
                help="The key the person's requests were routed by (asked for when left out: kept out of the "
                "shell's history). Never stored: the audit log names the subject by a keyed digest.",
            ),
            click.option("--reference", required=True, help="The request's reference (ticket), kept in the audit log."),
            click.option("--actor", default="cli", show_default=True),
        ]
    ):
        command = option(command)
    return command


@subject.command("export")
@_subject_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Default: stdout.")
@click.option("--no-decrypt", is_flag=True, help="Leave encrypted columns encrypted.")
def subject_export(key: str, reference: str, actor: str, out: Path | None, no_decrypt: bool) -> None:
    """Every logged row of the subject as JSON: predictions (inputs decrypted), feedback, unpaired KServe events."""
    from releasegate import subjects

    document = subjects.export(key, reference=reference, decrypt=not no_decrypt, actor=actor)
    text = json.dumps(document, indent=2, default=str)
    if out is None:
        click.echo(text)
        return
    out.touch(mode=0o600)
    out.write_text(text)
    click.echo(f"{len(document['predictions'])} predictions, {len(document['feedback'])} feedback rows -> {out}")


@subject.command("erase")
@_subject_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def subject_erase(key: str, reference: str, actor: str, yes: bool) -> None:
    """Delete every logged row of the subject: predictions, their feedback, unpaired KServe events."""
    from releasegate import subjects

    if not yes:
        click.confirm("Erase every logged row of this subject? This cannot be undone", abort=True)
    erased = subjects.erase(key, reference=reference, actor=actor)
    click.echo(
        f"subject {erased.subject}: {erased.predictions} predictions, {erased.feedback} feedback rows, "
        f"{erased.sink_events} KServe events erased"
    )


def _ensure_unpaused(client: Any, dag_id: str, unpause: bool) -> None:
    """A paused DAG never starts a triggered run: unpause it when asked, else say so (AirflowError)."""
    from releasegate import airflow_client as af

    if client.dag(dag_id).get("is_paused"):
        if not unpause:
            raise af.AirflowError(
                f"DAG {dag_id} is paused, so the run would never start: unpause it in the UI or pass --unpause"
            )
        client.unpause(dag_id)


def _airflow_options(command: _Command) -> _Command:
    """Which DAG, where Airflow's API server is and who calls it: options, or the RELEASEGATE_* variables in CI."""
    command = _airflow_connection(command)
    return click.option(
        "--dag-id", default="model_release", show_default=True, envvar="RELEASEGATE_DAG_ID", show_envvar=True
    )(command)


def _airflow_connection(command: _Command) -> _Command:
    """Where Airflow's API server is and who calls it: options, or the RELEASEGATE_AIRFLOW_* variables in CI."""
    for option in reversed(
        [
            click.option(
                "--airflow-url",
                envvar="RELEASEGATE_AIRFLOW_URL",
                show_envvar=True,
                default="http://127.0.0.1:8080",
                show_default=True,
            ),
            click.option("--user", envvar="RELEASEGATE_AIRFLOW_USER", show_envvar=True, default=None),
            click.option("--password", envvar="RELEASEGATE_AIRFLOW_PASSWORD", show_envvar=True, default=None),
            click.option(
                "--token",
                envvar="RELEASEGATE_AIRFLOW_TOKEN",
                show_envvar=True,
                default=None,
                help="A JWT instead of user and password.",
            ),
        ]
    ):
        command = option(command)
    return command


@main.command()
@click.option("--model", required=True, help="Registered model name in MLflow.")
@click.option("--version", default="", help="Version number or alias; empty means the `challenger` alias.")
@click.option("--policy", default=None, help="Release policy (include/policies/); default: the DAG's default.")
@click.option(
    "--wait/--no-wait",
    default=False,
    show_default=True,
    help="Follow the run, print its steps, exit with the release's outcome.",
)
@click.option("--conf-json", default=None, help="Extra run conf as a JSON object (merged under the params).")
@_airflow_options
@click.option("--unpause", is_flag=True, help="Unpause the DAG first if it is paused.")
@click.option("--poll-seconds", default=5.0, show_default=True)
@click.option("--timeout", default=None, type=float, help="Give up waiting after this many seconds (exit 2).")
def trigger(
    model: str,
    version: str,
    policy: str | None,
    wait: bool,
    conf_json: str | None,
    dag_id: str,
    airflow_url: str,
    user: str | None,
    password: str | None,
    token: str | None,
    unpause: bool,
    poll_seconds: float,
    timeout: float | None,
) -> None:
    """Start a release through Airflow's REST API; with --wait exit 0 promoted, 1 not promoted, 2 failed or error."""
    from releasegate import airflow_client as af

    try:
        extra = json.loads(conf_json) if conf_json else {}
        if not isinstance(extra, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise click.BadParameter(f"{err}", param_hint="--conf-json") from err
    try:
        with af.AirflowClient(airflow_url, token=token, username=user, password=password) as client:
            _ensure_unpaused(client, dag_id, unpause)
            run = client.trigger(
                dag_id,
                af.release_conf(model, version, policy, extra),
                note=f"releasegate trigger --model {model} --version {version or 'challenger'}",
            )
            click.echo(f"triggered {dag_id} run {run['dag_run_id']}: {client.ui_url(dag_id, run['dag_run_id'])}")
            if not wait:
                return
            outcome = af.follow(
                client, dag_id, run["dag_run_id"], echo=click.echo, poll_seconds=poll_seconds, timeout=timeout
            )
    except af.AirflowError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(af.EXIT_ERROR)
    click.echo(f"outcome: {outcome.message} (exit {outcome.exit_code})")
    sys.exit(outcome.exit_code)


@main.command()
@click.option("--model", required=True, help="Registered model name in MLflow; its champion is the control.")
@click.option("--arms", required=True, help="Versions or aliases besides the champion, comma separated (1-5).")
@click.option("--weights", default="", help="Each arm's percent, comma separated; empty: equal shares.")
@click.option("--design", default=None, help="Experiment design (policies' experiments/); default: the DAG's.")
@click.option(
    "--release-winner/--no-release-winner", default=True, show_default=True, help="Trigger model_release for it."
)
@click.option(
    "--wait/--no-wait", default=False, show_default=True, help="Follow the run; exit 0 with a winner, 1 without."
)
@click.option("--dag-id", default="model_experiment", show_default=True)
@_airflow_connection
@click.option("--unpause", is_flag=True, help="Unpause the DAG first if it is paused.")
@click.option("--poll-seconds", default=5.0, show_default=True)
@click.option("--timeout", default=None, type=float, help="Give up waiting after this many seconds (exit 2).")
def experiment(
    model: str,
    arms: str,
    weights: str,
    design: str | None,
    release_winner: bool,
    wait: bool,
    dag_id: str,
    airflow_url: str,
    user: str | None,
    password: str | None,
    token: str | None,
    unpause: bool,
    poll_seconds: float,
    timeout: float | None,
) -> None:
    """Start an A/B/n experiment (model_experiment) through Airflow's REST API (docs/experiments.md); with --wait
    exit 0 when an arm won, 1 when none did, 2 when the run failed or on any error."""
    from releasegate import airflow_client as af

    try:
        with af.AirflowClient(airflow_url, token=token, username=user, password=password) as client:
            _ensure_unpaused(client, dag_id, unpause)
            run = client.trigger(
                dag_id,
                af.experiment_conf(model, arms, weights, design, release_winner),
                note=f"releasegate experiment --model {model} --arms {arms}",
            )
            click.echo(f"triggered {dag_id} run {run['dag_run_id']}: {client.ui_url(dag_id, run['dag_run_id'])}")
            if not wait:
                return
            followed = af.follow(
                client,
                dag_id,
                run["dag_run_id"],
                echo=click.echo,
                poll_seconds=poll_seconds,
                timeout=timeout,
                summary_task=af.EXPERIMENT_SUMMARY_TASK,
            )
    except af.AirflowError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(af.EXIT_ERROR)
    code, message = af.experiment_outcome(followed)
    click.echo(f"outcome: {message} (exit {code})")
    sys.exit(code)


def _settling(seconds: float) -> None:
    from releasegate import airflow_client as af

    click.echo(
        f"waiting {seconds:.1f} s: Airflow takes an answer safely once its request is {af.SETTLE_SECONDS:.0f} s old",
        err=True,
    )
    time.sleep(seconds)


@main.command()
@click.argument("release_or_run")
@click.option("--model", default=None, help="Only a request about this model (a guard against a wrong id).")
@click.option("--reject", is_flag=True, help="Roll the release back instead of promoting it.")
@click.option("--comment", default=None, help="Why: kept in the release's audit log.")
@_airflow_options
def approve(
    release_or_run: str,
    model: str | None,
    reject: bool,
    comment: str | None,
    dag_id: str,
    airflow_url: str,
    user: str | None,
    password: str | None,
    token: str | None,
) -> None:
    """Answer a release's pending approval (a release id or an Airflow run id) as the Airflow user.

    Where the release's policy separates duties, the user who triggered it may not approve it (exit 1).
    """
    from releasegate import airflow_client as af

    try:
        with af.AirflowClient(airflow_url, token=token, username=user, password=password) as client:
            request = af.find_approval(client, dag_id, release_or_run, model)
            answered = af.answer(client, dag_id, request, approve=not reject, comment=comment, sleep=_settling)
    except af.ApprovalRefused as err:
        click.echo(f"REFUSED: {err}", err=True)
        sys.exit(1)
    except af.AirflowError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(af.EXIT_ERROR)
    click.echo(
        f"{request['task_instance']['dag_run_id']}: {answered['chosen_options'][0]} "
        f"(answered by {answered['responded_by']['name']})"
    )


# --- demo ------------------------------------------------------------------------------------


@main.command()
@click.option("--model", default="churn", show_default=True)
@click.option("--gateway-url", default=None, help="Default: $RELEASEGATE_GATEWAY_URL.")
@click.option("--api-key", envvar="RELEASEGATE_API_KEY", default=None, help="A predict+feedback (or admin) key.")
@click.option("--rps", default=300.0, show_default=True)
@click.option("--duration", default=60.0, show_default=True, help="Seconds; 0 runs until stopped.")
@click.option("--feedback-delay", default=1.0, show_default=True, help="Seconds before each label is sent.")
@click.option("--drift", default=0.0, show_default=True, help="Drift knob of the demo data, 0 to 1.")
@click.option("--seed", default=7, show_default=True)
@click.option(
    "--data",
    "data_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Replay your own rows (parquet or csv) instead of the demo's: each request is one row drawn "
    "at random, sent without the --label column.",
)
@click.option("--label", default=None, help="With --data: the column posted as feedback after --feedback-delay.")
def traffic(
    model: str,
    gateway_url: str | None,
    api_key: str | None,
    rps: float,
    duration: float,
    feedback_delay: float,
    drift: float,
    seed: int,
    data_path: Path | None,
    label: str | None,
) -> None:
    """Send traffic to the gateway (the demo's, or --data replayed), with delayed feedback labels; prints progress."""
    from releasegate.demo import traffic as demo_traffic
    from releasegate.settings import get_settings

    rows = None
    if data_path is not None:
        if not label:
            raise click.UsageError("--data needs --label: the column whose values are posted as feedback")
        if drift:
            raise click.UsageError("--drift shapes the demo's data; it does not apply to --data")
        try:
            rows = demo_traffic.replay_rows(data_path, label)
        except demo_traffic.ReplayError as err:
            raise click.BadParameter(str(err), param_hint="--data") from None
    elif label:
        raise click.UsageError("--label names a column of --data; the demo's traffic has its own label")
    settings = get_settings()
    demo_traffic.run(
        model=model,
        gateway_url=gateway_url or settings.gateway_url,
        api_key=api_key or settings.admin_api_key,
        rps=rps,
        duration=duration,
        feedback_delay=feedback_delay,
        drift=drift,
        seed=seed,
        rows=rows,
    )


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".releasegate/demo"), show_default=True)
@click.option("--port", default=8765, show_default=True, type=int)
def demo(workdir: Path, port: int) -> None:
    """The whole story on this machine: register, serve, release a good and a bad candidate, summarise."""
    from releasegate.demo import run as demo_run

    sys.exit(demo_run.main(workdir=workdir, port=port))


if __name__ == "__main__":
    main()
