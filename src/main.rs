//! The `bulkhead` command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use bulkhead::cli::sandbox::SandboxArgs;

/// bulkhead: per-tenant isolation for LLM-agent platforms.
#[derive(Parser)]
#[command(name = "bulkhead", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one command in a fresh sandbox (no daemon): like bwrap, with Landlock and
    /// seccomp always on. Exits with the command's status (128+signal when killed),
    /// 125 when the sandbox could not be built, 126/127 when the command could not run.
    Sandbox(SandboxArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// The daemon: tenant socket and admin socket (see DESIGN.md). State in --state-dir,
    /// else $STATE_DIRECTORY, else ./.bulkhead; sockets in $RUNTIME_DIRECTORY or the state
    /// dir. Supports systemd socket activation (socket names `tenant`, `admin`) and
    /// sd_notify.
    Serve {
        /// State directory.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Admin config (default <state>/config.toml; absent means embedded defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Log format on stderr: text, or json (one object per event, for journald/SIEM).
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Manage tenants through the admin socket.
    Tenants {
        #[command(flatten)]
        at: StateArgs,
        #[command(subcommand)]
        op: TenantOp,
    },
    /// Run a command in the tenant's sandbox through the daemon; exit status, stdout and
    /// stderr pass through.
    Exec {
        #[command(flatten)]
        at: StateArgs,
        /// Tenant token (default: $BULKHEAD_TOKEN).
        #[arg(long)]
        token: Option<String>,
        /// Wall-clock limit.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Working directory under /work.
        #[arg(long)]
        cwd: Option<String>,
        /// Extra environment variable (repeatable).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Kill switch: refuse all new work daemon-wide (503 halted) and kill what runs.
    Halt {
        #[command(flatten)]
        at: StateArgs,
    },
    /// Lift the kill switch.
    Resume {
        #[command(flatten)]
        at: StateArgs,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        op: AuditOp,
    },
    #[command(name = "__spawner", hide = true)]
    Spawner {
        #[arg(long)]
        fd: i32,
        #[arg(long)]
        parent: Option<i32>,
    },
}

#[derive(clap::Args)]
struct StateArgs {
    /// State directory of the daemon (default: $BULKHEAD_STATE_DIR, else ./.bulkhead).
    #[arg(long, env = "BULKHEAD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Directory of the sockets (default: where the daemon recorded them in
    /// <state>/sockets.json, else the state dir).
    #[arg(long)]
    socket_dir: Option<PathBuf>,
}

impl StateArgs {
    fn paths(&self) -> bulkhead::api::Paths {
        bulkhead::api::Paths::for_client(
            self.state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(".bulkhead")),
            self.socket_dir.clone(),
        )
    }
}

#[derive(Subcommand)]
enum TenantOp {
    /// Create a tenant; prints its token (only the token), once.
    Create { name: String },
    /// List tenants.
    List,
    /// Delete a tenant: kills its sandboxes, revokes its tokens, removes its root.
    Delete { name: String },
    /// Freeze a tenant (every request gets 423 tenant_frozen; running sandboxes are killed).
    Freeze { name: String },
    /// Unfreeze a tenant.
    Unfreeze { name: String },
    /// Kill a tenant's running sandboxes now (it stays usable).
    Stop { name: String },
    /// Show a tenant's limits, or set them: KEY=VALUE (a number, or `none` to unset).
    /// Keys: max_concurrent requests_per_s exec_per_s max_wall_ms max_output_bytes
    /// steps_per_day cpu_s_per_day memory_bytes pids disk_bytes egress_bytes_per_day
    /// daily_budget_usd monthly_budget_usd actor_daily_budget_usd actor_monthly_budget_usd
    /// rpm tpm, and the lists
    /// egress=HOST:PORT,... (destinations for the sandbox's proxy, e.g.
    /// egress=pypi.org:443,*.github.com:443; `egress=` allows none) and
    /// allowed_models=NAME,... (the models the tenant may call).
    Limits { name: String, pairs: Vec<String> },
    /// Tokens.
    Token {
        #[command(subcommand)]
        op: TokenOp,
    },
}

#[derive(Subcommand)]
enum TokenOp {
    /// Replace the tenant's primary token; prints the new one. The old one stops working at once.
    Rotate { name: String },
    /// Add a token (one more actor); prints it.
    Create {
        name: String,
        #[arg(long, default_value = "default")]
        workspace: String,
        /// owner|admin|member|viewer
        #[arg(long, default_value = "member")]
        role: String,
        /// Comma-separated tool allowlist (exec, files.read, files.write, config.read, config.write,
        /// llm, retrieval.read, retrieval.write, memory.read, memory.write).
        #[arg(long, value_delimiter = ',')]
        tools: Option<Vec<String>>,
        /// Comma-separated datasources of the workspace the token may use (default: all).
        #[arg(long, value_delimiter = ',')]
        datasources: Option<Vec<String>>,
    },
    /// Revoke a token by id (tk_<tenant>_<8 hex>).
    Revoke { id: String },
}

#[derive(Subcommand)]
enum AuditOp {
    /// Verify the hash chain; reports the first bad line and exits non-zero.
    ///
    /// Checks the log as the daemon's next start will leave it: with the committed lines
    /// of `audit.wal` beside it written in where they go (after a crash they may be only
    /// there), and against `audit.head`. A ring that the start would refuse fails too.
    Verify {
        /// The log (default: <state>/audit.jsonl).
        file: Option<PathBuf>,
        #[command(flatten)]
        at: StateArgs,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Cold-start latency of /bin/true: bubblewrap vs bulkhead (process and library) vs a
    /// plain spawn, interleaved in one run.
    Coldstart(bulkhead::bench::ColdstartArgs),
    /// Concurrent GET /v1/files against a daemon with many tenants: requests/s, p99 and
    /// the daemon's peak RSS.
    Files {
        #[command(flatten)]
        args: bulkhead::bench::FilesArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Full-text retrieval through the library: ingestion, search latency across one big
    /// tenant, database size, and optionally search across many small tenants.
    Retrieval {
        #[command(flatten)]
        args: bulkhead::bench::retrieval::RetrievalArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// LLM routing overhead: chat completions straight to a fake upstream and through the
    /// daemon in one run: whole answers and time to the first streamed byte at several
    /// concurrencies, 200 clients paced below saturation, and memory per open stream.
    Llm {
        #[command(flatten)]
        args: bulkhead::bench::llm::LlmArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Throughput: /bin/true runs per second with concurrent clients, bubblewrap against
    /// POST /v1/exec (one tenant per client, in warm cells), and idle memory per cell.
    Throughput {
        #[command(flatten)]
        args: bulkhead::bench::throughput::ThroughputArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Noisy neighbour: tenant B's exec latency with tenant A idle, then while A floods
    /// (200 concurrent execs: CPU hogs, fork bombs, output floods), in one run.
    Noisy {
        #[command(flatten)]
        args: bulkhead::bench::noisy::NoisyArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Spawner { fd, parent } => {
            match bulkhead::sandbox::channel::adopt_inherited_socket(fd) {
                Ok(sock) => {
                    ExitCode::from(bulkhead::spawner::run_spawner(sock, parent).clamp(0, 255) as u8)
                }
                Err(e) => {
                    eprintln!("bulkhead __spawner: fd {fd}: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Serve {
            state_dir,
            config,
            log_format,
        } => {
            init_logging(log_format == "json");
            let paths = bulkhead::api::Paths::resolve(state_dir, config);
            match bulkhead::api::prepare(paths).and_then(bulkhead::api::serve) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bulkhead serve: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Tenants { at, op } => client_main(tenants(at, op)),
        Command::Halt { at } => client_main(switch(at, "halt")),
        Command::Resume { at } => client_main(switch(at, "resume")),
        Command::Exec {
            at,
            token,
            timeout_ms,
            cwd,
            env,
            cmd,
        } => client_main(exec(at, token, timeout_ms, cwd, env, cmd)),
        Command::Audit {
            op: AuditOp::Verify { file, at },
        } => {
            let file = file.unwrap_or_else(|| at.paths().state_dir.join("audit.jsonl"));
            match bulkhead::audit::verify_file(&file) {
                Ok(r) if r.in_wal > 0 => {
                    println!(
                        "ok: {} lines, chain intact, and {} more committed in audit.wal that \
                         continue it (a running daemon is appending them; after a crash, the \
                         next start writes them into the log; last hash {})",
                        r.lines, r.in_wal, r.last_hash
                    );
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    println!(
                        "ok: {} lines, chain intact (last hash {})",
                        r.lines, r.last_hash
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("audit verify: {}: {e}", file.display());
                    ExitCode::from(1)
                }
            }
        }
        Command::Sandbox(args) => bulkhead::cli::sandbox::run(args),
        Command::Bench {
            which: BenchCommand::Retrieval { args, json },
        } => match bulkhead::bench::retrieval::retrieval(&args) {
            Ok(r) if json => {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Ok(r) => {
                bulkhead::bench::retrieval::print(&r);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bulkhead: bench: {e}");
                ExitCode::from(1)
            }
        },
        Command::Bench {
            which: BenchCommand::Files { args, json },
        } => {
            let exe = match std::env::current_exe() {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("bulkhead: bench: {e}");
                    return ExitCode::from(1);
                }
            };
            match bulkhead::bench::files(&args, &exe) {
                Ok(r) if json => {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    println!(
                        "{} GET /v1/files from {} clients over {} tenants: {:.0} requests/s, p50 {} us, p99 {} us; daemon peak RSS {:.1} MiB (target < 50 MiB with 100 tenants)",
                        r.requests,
                        args.clients,
                        r.tenants,
                        r.requests_per_s,
                        r.p50_us,
                        r.p99_us,
                        r.peak_rss_mib
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("bulkhead: bench: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Bench {
            which: BenchCommand::Noisy { args, json },
        } => {
            let report = std::env::current_exe()
                .map_err(|e| e.to_string())
                .and_then(|exe| bulkhead::bench::noisy::noisy(&args, &exe));
            match report {
                Ok(r) if json => {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    bulkhead::bench::noisy::print(&r);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("bulkhead: bench: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Bench {
            which: BenchCommand::Llm { args, json },
        } => {
            let report = std::env::current_exe()
                .map_err(|e| e.to_string())
                .and_then(|exe| bulkhead::bench::llm::llm(&args, &exe));
            match report {
                Ok(r) if json => {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    bulkhead::bench::llm::print(&r);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("bulkhead: bench: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Bench {
            which: BenchCommand::Throughput { args, json },
        } => {
            let report = std::env::current_exe()
                .map_err(|e| e.to_string())
                .and_then(|exe| bulkhead::bench::throughput::throughput(&args, &exe));
            match report {
                Ok(r) if json => {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    bulkhead::bench::throughput::print(&r);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("bulkhead: bench: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Bench {
            which: BenchCommand::Coldstart(args),
        } => match bulkhead::bench::coldstart_cli(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bulkhead: bench: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// Runs a client future; `Ok(code)` is the exit status, `Err` a message (exit 1).
fn client_main(fut: impl std::future::Future<Output = Result<u8, String>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulkhead: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(fut) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("bulkhead: {e}");
            ExitCode::from(1)
        }
    }
}

fn admin_client(at: &StateArgs) -> Result<bulkhead::client::SocketClient, String> {
    let paths = at.paths();
    let key = std::fs::read_to_string(paths.admin_key())
        .map_err(|e| format!("admin key {}: {e}", paths.admin_key().display()))?;
    Ok(bulkhead::client::SocketClient::new(
        &paths.admin_socket(),
        &key,
    ))
}

fn check(reply: bulkhead::client::Reply) -> Result<serde_json::Value, String> {
    if reply.status.is_success() {
        return Ok(reply.json());
    }
    let v = reply.json();
    Err(format!(
        "{} {}: {}",
        reply.status.as_u16(),
        v["error"]["reason_code"].as_str().unwrap_or("error"),
        v["error"]["message"].as_str().unwrap_or("")
    ))
}

async fn tenants(at: StateArgs, op: TenantOp) -> Result<u8, String> {
    use hyper::Method;
    let c = admin_client(&at)?;
    match op {
        TenantOp::Create { name } => {
            let v = check(
                c.json(
                    Method::POST,
                    "/admin/tenants",
                    &serde_json::json!({"name": name}),
                )
                .await?,
            )?;
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        TenantOp::List => {
            let v = check(c.request(Method::GET, "/admin/tenants", Vec::new()).await?)?;
            for t in v["tenants"].as_array().cloned().unwrap_or_default() {
                let tokens: Vec<String> = t["tokens"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|k| {
                        format!(
                            "{}({})",
                            k["id"].as_str().unwrap_or(""),
                            k["role"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                println!(
                    "{}\t{}\tuid={}\t{}",
                    t["name"].as_str().unwrap_or(""),
                    if t["frozen"].as_bool().unwrap_or(false) {
                        "frozen"
                    } else {
                        "active"
                    },
                    t["host_uid"],
                    tokens.join(",")
                );
            }
        }
        TenantOp::Delete { name } => {
            check(
                c.request(
                    Method::DELETE,
                    &format!("/admin/tenants/{name}"),
                    Vec::new(),
                )
                .await?,
            )?;
        }
        TenantOp::Freeze { name } => {
            check(
                c.request(
                    Method::POST,
                    &format!("/admin/tenants/{name}/freeze"),
                    Vec::new(),
                )
                .await?,
            )?;
        }
        TenantOp::Unfreeze { name } => {
            check(
                c.request(
                    Method::POST,
                    &format!("/admin/tenants/{name}/unfreeze"),
                    Vec::new(),
                )
                .await?,
            )?;
        }
        TenantOp::Limits { name, pairs } => {
            if pairs.is_empty() {
                let v = check(
                    c.request(
                        Method::GET,
                        &format!("/admin/tenants/{name}/limits"),
                        Vec::new(),
                    )
                    .await?,
                )?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v["effective"]).unwrap_or_default()
                );
            } else {
                let mut patch = serde_json::Map::new();
                for kv in pairs {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or(format!("{kv:?}: expected KEY=VALUE"))?;
                    let value = if v == "none" {
                        serde_json::Value::Null
                    } else if k == "egress" || k == "allowed_models" {
                        serde_json::Value::Array(
                            v.split(',')
                                .filter(|p| !p.is_empty())
                                .map(|p| serde_json::Value::String(p.to_string()))
                                .collect(),
                        )
                    } else {
                        serde_json::from_str::<serde_json::Number>(v)
                            .map(serde_json::Value::Number)
                            .map_err(|_| format!("{k}: {v:?} is not a number"))?
                    };
                    patch.insert(k.to_string(), value);
                }
                let v = check(
                    c.json(
                        Method::PUT,
                        &format!("/admin/tenants/{name}/limits"),
                        &serde_json::Value::Object(patch),
                    )
                    .await?,
                )?;
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
        }
        TenantOp::Stop { name } => {
            check(
                c.request(
                    Method::POST,
                    &format!("/admin/tenants/{name}/stop"),
                    Vec::new(),
                )
                .await?,
            )?;
        }
        TenantOp::Token {
            op: TokenOp::Rotate { name },
        } => {
            let v = check(
                c.request(
                    Method::POST,
                    &format!("/admin/tenants/{name}/tokens/rotate"),
                    Vec::new(),
                )
                .await?,
            )?;
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        TenantOp::Token {
            op:
                TokenOp::Create {
                    name,
                    workspace,
                    role,
                    tools,
                    datasources,
                },
        } => {
            let mut body = serde_json::json!({"workspace": workspace, "role": role});
            if let Some(t) = tools {
                body["tools"] = t.into();
            }
            if let Some(d) = datasources {
                body["datasources"] = d.into();
            }
            let v = check(
                c.json(
                    Method::POST,
                    &format!("/admin/tenants/{name}/tokens"),
                    &body,
                )
                .await?,
            )?;
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        TenantOp::Token {
            op: TokenOp::Revoke { id },
        } => {
            check(
                c.request(Method::DELETE, &format!("/admin/tokens/{id}"), Vec::new())
                    .await?,
            )?;
        }
    }
    Ok(0)
}

async fn switch(at: StateArgs, action: &str) -> Result<u8, String> {
    let c = admin_client(&at)?;
    check(
        c.request(hyper::Method::POST, &format!("/admin/{action}"), Vec::new())
            .await?,
    )?;
    Ok(0)
}

async fn exec(
    at: StateArgs,
    token: Option<String>,
    timeout_ms: Option<u64>,
    cwd: Option<String>,
    env: Vec<String>,
    cmd: Vec<String>,
) -> Result<u8, String> {
    use std::io::Write;
    let token = token
        .or_else(|| std::env::var("BULKHEAD_TOKEN").ok())
        .ok_or("no token: pass --token or set BULKHEAD_TOKEN")?;
    let mut envs = serde_json::Map::new();
    for kv in env {
        let (k, v) = kv
            .split_once('=')
            .ok_or(format!("--env {kv:?}: expected K=V"))?;
        envs.insert(k.into(), v.into());
    }
    let mut body = serde_json::json!({"argv": cmd, "env": envs});
    if let Some(t) = timeout_ms {
        body["timeout_ms"] = t.into();
    }
    if let Some(c) = cwd {
        body["cwd"] = c.into();
    }
    let c = bulkhead::client::SocketClient::new(&at.paths().tenant_socket(), &token);
    let reply = c.json(hyper::Method::POST, "/v1/exec", &body).await?;
    let v = reply.json();
    if !reply.status.is_success() {
        let code = v["error"]["reason_code"].as_str().unwrap_or("error");
        eprintln!(
            "bulkhead: {} {code}: {}",
            reply.status.as_u16(),
            v["error"]["message"].as_str().unwrap_or("")
        );
        return Ok(if code == "exec_failed" { 127 } else { 125 });
    }
    let _out = std::io::stdout().write_all(v["stdout"].as_str().unwrap_or_default().as_bytes());
    let _err = std::io::stderr().write_all(v["stderr"].as_str().unwrap_or_default().as_bytes());
    if v["stdout_truncated"].as_bool() == Some(true)
        || v["stderr_truncated"].as_bool() == Some(true)
    {
        eprintln!(
            "bulkhead: output truncated at {} bytes",
            v["output_cap_bytes"]
        );
    }
    if v["timed_out"].as_bool() == Some(true) {
        eprintln!("bulkhead: timed out; sandbox killed");
    }
    let code = match (v["exit_code"].as_i64(), v["signal"].as_i64()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 125,
    };
    Ok(code.clamp(0, 255) as u8)
}
