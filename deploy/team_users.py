"""Users and permissions of a team tracking server that runs MLflow's basic-auth app
(`mlflow server --app-name basic-auth`, as deploy/local_stack.py starts it).

    export MLFLOW_TRACKING_URI=http://tracking-host:5000
    export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=...   # an admin's, never an argument
    python deploy/team_users.py add alice                 # asks for alice's password (or reads stdin)
    python deploy/team_users.py password alice            # sets a new one
    python deploy/team_users.py grant alice experiment charseg-demo READ
    python deploy/team_users.py grant bob registered-model charseg EDIT
    python deploy/team_users.py admin alice               # alice becomes an admin

Permissions (MLflow's): READ, USE, EDIT, MANAGE, NO_PERMISSIONS. A user manages the experiments
and registered models they create; what others made they reach only when granted (the stack's
default permission is NO_PERMISSIONS).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from mlflow import MlflowClient
from mlflow.server import get_app_client

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
RESOURCES = {"experiment": "experiment", "registered-model": "registered_model"}


def auth_client(tracking_uri: str):
    """The basic-auth app's client; it authenticates with $MLFLOW_TRACKING_USERNAME/PASSWORD."""
    return get_app_client("basic-auth", tracking_uri=tracking_uri)


def add_user(tracking_uri: str, username: str, password: str) -> None:
    auth_client(tracking_uri).create_user(username=username, password=password)


def set_password(tracking_uri: str, username: str, password: str) -> None:
    auth_client(tracking_uri).update_user_password(username=username, password=password)


def grant(tracking_uri: str, username: str, resource: str, name: str, permission: str) -> None:
    """Give USERNAME PERMISSION on the experiment or registered model NAME (replacing any they had)."""
    if permission not in PERMISSIONS:
        raise SystemExit(f"unknown permission {permission!r}; choose one of {', '.join(PERMISSIONS)}")
    if resource == "experiment":
        experiment = MlflowClient(tracking_uri).get_experiment_by_name(name)
        if experiment is None:
            raise SystemExit(f"no experiment named {name!r} at {tracking_uri}")
        resource_id = experiment.experiment_id
    else:
        resource_id = name
    client = auth_client(tracking_uri)
    try:
        client.revoke_user_permission(username, RESOURCES[resource], resource_id)
    except Exception:  # none granted before
        pass
    client.grant_user_permission(username, RESOURCES[resource], resource_id, permission)


def read_password(username: str) -> str:
    """A password from the terminal (asked twice) or, piped, the first line of stdin."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"password for {username}: ")
    if first != getpass.getpass("again: "):
        raise SystemExit("the passwords differ")
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("add", help="create a user").add_argument("username")
    sub.add_parser("password", help="set a user's password").add_argument("username")
    sub.add_parser("admin", help="make a user an admin").add_argument("username")
    granting = sub.add_parser("grant", help="give a user a permission on an experiment or registered model")
    granting.add_argument("username")
    granting.add_argument("resource", choices=sorted(RESOURCES))
    granting.add_argument("name")
    granting.add_argument("permission", choices=PERMISSIONS)
    args = parser.parse_args()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        raise SystemExit("set MLFLOW_TRACKING_URI and an admin's MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if args.action == "add":
        add_user(uri, args.username, read_password(args.username))
    elif args.action == "password":
        set_password(uri, args.username, read_password(args.username))
    elif args.action == "admin":
        auth_client(uri).update_user_admin(username=args.username, is_admin=True)
    else:
        grant(uri, args.username, args.resource, args.name, args.permission)
    print(f"{args.action}: done for {args.username}")


if __name__ == "__main__":
    main()
