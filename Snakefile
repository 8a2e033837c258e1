# ffmerge: merge feed-forward sublayers of pretrained Transformers (Verma, Murray, Duh 2025).
# Offline default: `snakemake --cores 2`; paper scale: `snakemake --configfile configs/paper.yaml ...`.
import os
import sys

from snakemake.utils import min_version, validate

min_version("9.0")

# The package's source tree is importable here and in every job, with or without `pip install -e .`
# (conda envs from envs/ install only third-party packages).
SRC = os.path.join(workflow.basedir, "src")
sys.path.insert(0, SRC)
# (written for the jobs, not read from the user, hence no envvars directive)
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])))

# config.yaml is the default only: `--configfile other.yaml` replaces it instead of merging into it.
if not workflow.overwrite_configfiles:
    workflow.configfile(os.path.join(workflow.basedir, "config.yaml"))


# Snakemake 9's scheduler loop gains one 1 s wake-up timer per finished job (ffmerge.workflow.snakemake_fixes): 31 % of a
# core three quarters into the default run, taken from the jobs. One pending timer wakes it as often as needed.
from ffmerge.workflow.snakemake_fixes import coalesce_reevaluation_timers

coalesce_reevaluation_timers()

from ffmerge.workflow.preflight import check_renamed_keys, check_results_dir, preflight

check_renamed_keys(config)  # keys of earlier releases: say what replaced them before the schema calls them unknown
validate(config, "schemas/config.schema.yaml")
preflight(config)
# a results folder made with another model, data, seed or split sizes would be rebuilt over: refuse, naming the keys
check_results_dir(config)


include: "rules/common.smk"
include: "rules/prepare.smk"
include: "rules/features.smk"
include: "rules/search.smk"
include: "rules/compress.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/quantize.smk"
include: "rules/cka.smk"
include: "rules/tables.smk"
include: "rules/report.smk"


# Local runs: job scripts fork from one interpreter that has imported torch and transformers once, instead of
# importing them again in each of the 140 model jobs (ffmerge.workflow.forkserver; `--config fork_server=false` to turn
# it off). Cluster jobs and conda-env jobs run as plain processes.
FORK_SERVER = []


onstart:
    if workflow.local_exec:  # local jobs stop when this process is gone (ffmerge.workflow.jobs.die_with_snakemake)
        from ffmerge.workflow.jobs import SNAKEMAKE_PID_ENV

        os.environ[SNAKEMAKE_PID_ENV] = str(os.getpid())
    if config["fork_server"] and workflow.local_exec and not workflow.deployment_settings.deployment_method:
        from ffmerge.workflow.forkserver import ForkServer

        FORK_SERVER.append(ForkServer(f"{config['results_dir']}/logs/fork_server.log"))


onsuccess:
    for server in FORK_SERVER:
        server.stop()
    from ffmerge.report.tables import disk_footprint, footprint_text

    print(footprint_text(disk_footprint(config["results_dir"], config["tasks"])))


onerror:
    for server in FORK_SERVER:
        server.stop()


rule all:
    input:
        all_outputs(),
    default_target: True
