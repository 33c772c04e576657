//! The relayd daemon: arguments → config → logger → relay until SIGINT/SIGTERM (a second one
//! forces the close; SIGHUP reloads the config file) → exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use async_signal::{Signal, Signals};
use futures::StreamExt;
use relayd::logging::{self, Format};
use relayd::{Config, Relay, ShutdownReport, StartError, rt};

const USAGE: &str =
    "usage: relayd [--config PATH] [--check] [--log-level LEVEL] [--log-format auto|pretty|json] [--version] [--help]
       relayd ctl [--admin PATH | --config PATH] COMMAND

  -c, --config PATH       RON config file (default: config/relayd.ron)
      --check             validate the config, say what a reload of the running relayd would
                          change, and exit (0 when valid)
      --log-level LEVEL   error, warn, info, debug or trace (overrides the config's log_level)
      --log-format FMT    pretty on a terminal and json otherwise (auto, the default), or as given
  -V, --version           the version and the git revision it was built from
  -h, --help              this text

relayd ctl sends COMMAND to a running relayd's admin socket (--admin, else the config's
`admin`) and prints its answer; it exits 1 when the command is refused:
  show                                       routes, backends, their state and sessions
  backend ROUTE ADDR drain|disable|enable    drain: no new sessions, live ones go on;
                                             disable: as drain, and its checks stop;
                                             enable: back to its health
  egress NAME drain|enable                   drain: no new session leaves by it";

/// Exit code for a config or usage error; 1 is for a failure to run.
const BAD_INPUT: u8 = 2;

struct Args {
    config: PathBuf,
    check: bool,
    log_level: Option<log::LevelFilter>,
    log_format: Option<Format>,
}

impl Args {
    /// `Ok(None)` for `--help`.
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
        let mut parsed = Args {
            config: PathBuf::from("config/relayd.ron"),
            check: false,
            log_level: None,
            log_format: None,
        };
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--config" | "-c" => parsed.config = value()?.into(),
                "--check" => parsed.check = true,
                "--log-level" => {
                    let level = value()?;
                    let level = level
                        .parse()
                        .map_err(|_| format!("--log-level: {level:?} is not a level"))?;
                    parsed.log_level = Some(level);
                }
                "--log-format" => parsed.log_format = Some(value()?.parse().map_err(|e| format!("--log-format: {e}"))?),
                "--help" | "-h" => return Ok(None),
                "--version" | "-V" => {
                    println!("relayd {} ({})", env!("CARGO_PKG_VERSION"), env!("RELAYD_REVISION"));
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(Some(parsed))
    }
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().is_some_and(|a| a == "ctl") {
        return ctl(argv.skip(1));
    }
    let args = match Args::parse(argv) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("relayd: {e}\n{USAGE}");
            return ExitCode::from(BAD_INPUT);
        }
    };
    let settings = match Config::load(&args.config) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("relayd: {e}");
            return ExitCode::from(BAD_INPUT);
        }
    };
    if args.check {
        println!("{}: ok ({} routes)", args.config.display(), settings.routes.len());
        if let Some(addr) = &settings.status {
            compare_with_running(addr, &settings);
        }
        return ExitCode::SUCCESS;
    }
    limit_malloc_arenas(&settings);
    let level = args.log_level.unwrap_or(settings.log_level);
    let _ = logging::init(level, args.log_format.unwrap_or_else(Format::auto));
    // As HAProxy and nginx do: the soft descriptor limit is a default, not a choice.
    if let Err(e) = relayd::limits::raise_nofile() {
        log::warn!(err:% = e; "cannot raise the descriptor limit");
    }
    // The handler goes in before anything listens: a signal that came between the "listening"
    // line and the handler would otherwise kill the process without a drain.
    let signals = Signals::new([Signal::Int, Signal::Term, Signal::Hup, Signal::Usr1]);
    let log_level = args.log_level;
    match rt::block_on(serve(settings, signals, &args.config, log_level)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!(err:% = e; "cannot start");
            ExitCode::FAILURE
        }
    }
}

/// `relayd ctl`: one command to the admin socket, its answer on stdout (a refusal on stderr).
fn ctl(mut args: impl Iterator<Item = String>) -> ExitCode {
    let (mut admin, mut config, mut words) = (None::<PathBuf>, PathBuf::from("config/relayd.ron"), Vec::new());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--admin" | "--config" | "-c" => {
                let Some(value) = args.next() else {
                    eprintln!("relayd ctl: {arg} needs a value\n{USAGE}");
                    return ExitCode::from(BAD_INPUT);
                };
                match arg.as_str() {
                    "--admin" => admin = Some(value.into()),
                    _ => config = value.into(),
                }
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => words.push(arg),
        }
    }
    if words.is_empty() {
        eprintln!("relayd ctl: no command\n{USAGE}");
        return ExitCode::from(BAD_INPUT);
    }
    let path = match admin {
        Some(path) => path,
        None => {
            let file = std::fs::read_to_string(&config).map_err(|e| e.to_string());
            let parsed =
                file.and_then(|text| Config::parse(&text, &config.display().to_string()).map_err(|e| e.to_string()));
            match parsed.map(|c| c.admin) {
                Ok(Some(path)) => path.into(),
                Ok(None) => {
                    eprintln!(
                        "relayd ctl: {} has no admin socket: give --admin PATH",
                        config.display()
                    );
                    return ExitCode::from(BAD_INPUT);
                }
                Err(e) => {
                    eprintln!("relayd ctl: {e} (or give --admin PATH)");
                    return ExitCode::from(BAD_INPUT);
                }
            }
        }
    };
    match relayd::admin::send(&path, &words.join(" ")) {
        Ok(answer) => {
            print!("{answer}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("relayd ctl: {why}");
            ExitCode::FAILURE
        }
    }
}

/// Prints what a reload of the relayd answering at `addr` would change, in the words its log
/// would use, from the config it runs (`GET /config`). Passwords are hidden on both sides, so
/// a changed password is not shown here.
fn compare_with_running(addr: &relayd::config::StatusAddr, new: &relayd::Settings) {
    let running = fetch_config(addr).and_then(|text| {
        let parsed = Config::parse(&text, "the running config").map_err(|e| e.to_string())?;
        parsed.validate().map_err(|e| e.to_string())
    });
    let running = match running {
        Ok(running) => running,
        Err(e) => {
            println!("no running relayd to compare with at {addr}: {e}");
            return;
        }
    };
    let new = match new.source.masked().validate() {
        Ok(new) => new,
        Err(e) => return println!("cannot compare: {e}"),
    };
    let changes = relayd::config::diff(&running, &new);
    match changes.is_empty() {
        true => println!("a reload of the relayd at {addr} would change nothing"),
        false => println!("a reload of the relayd at {addr} would change:"),
    }
    for change in changes {
        println!("  {change}");
    }
}

/// The body of `GET /config` from the status listener at `addr`.
fn fetch_config(addr: &relayd::config::StatusAddr) -> Result<String, String> {
    use relayd::config::StatusAddr;
    use std::io::{Read, Write};
    let patience = std::time::Duration::from_secs(3);
    let mut stream: Box<dyn ReadWrite> = match addr {
        StatusAddr::Tcp(addr) => {
            let stream = std::net::TcpStream::connect_timeout(addr, patience).map_err(|e| e.to_string())?;
            stream.set_read_timeout(Some(patience)).map_err(|e| e.to_string())?;
            Box::new(stream)
        }
        StatusAddr::Unix(path) => {
            let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
            stream.set_read_timeout(Some(patience)).map_err(|e| e.to_string())?;
            Box::new(stream)
        }
    };
    stream
        .write_all(b"GET /config HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no answer")?;
    match head.starts_with("HTTP/1.0 200") {
        true => Ok(body.to_string()),
        false => Err(format!("it answered {:?}", head.lines().next().unwrap_or_default())),
    }
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// glibc gives each thread that contends its own arena (up to 8 per core), and an arena keeps
/// its partly used pages: with 9,000 idle sessions that was 3.8-4.6 KiB per session against
/// 3.4-3.8 with one arena per worker. The hot path allocates next to nothing, so there is
/// little contention to lose. A process-wide choice, so the daemon makes it, not the library.
fn limit_malloc_arenas(settings: &relayd::Settings) {
    #[cfg(target_env = "gnu")]
    {
        let workers = settings.workers.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            |n| n.get(),
        );
        // SAFETY: mallopt only sets a tuning value, before any worker thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, workers.max(2) as libc::c_int);
        }
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = settings;
}

/// Runs the relay until SIGINT or SIGTERM, reloading `path` on SIGHUP, then drains it; a
/// second SIGINT or SIGTERM closes live sessions at once. The config's `log_level` applies
/// on reload unless `--log-level` was given.
async fn serve(
    settings: relayd::Settings,
    signals: std::io::Result<Signals>,
    path: &Path,
    log_level: Option<log::LevelFilter>,
) -> Result<ShutdownReport, StartError> {
    let mut relay = Relay::with_settings(settings)?;
    let mut signals = match signals {
        Ok(signals) => signals,
        Err(e) => {
            // Without a handler the default action (exit) still stops the process.
            log::warn!(err:% = e; "cannot handle signals: SIGINT and SIGTERM will end the process at once");
            return futures::future::pending().await;
        }
    };
    while let Some(signal) = signals.next().await {
        match signal {
            Ok(Signal::Hup) => {
                log::info!(path:% = path.display(); "SIGHUP: reloading the config");
                if relay.reload_file(path).await.is_ok() {
                    log::set_max_level(log_level.unwrap_or(relay.settings().log_level));
                }
            }
            Ok(Signal::Usr1) => log::info!("SIGUSR1 ignored (SIGHUP reloads the config)"),
            Ok(signal) => {
                log::info!(signal:? = signal; "signal received");
                break;
            }
            Err(e) => log::warn!(err:% = e; "reading signals failed"),
        }
    }
    Ok(relay.shutdown_or(asked_again(&mut signals)).await)
}

/// Completes on the next SIGINT or SIGTERM, while the relay drains.
async fn asked_again(signals: &mut Signals) {
    while let Some(signal) = signals.next().await {
        match signal {
            Ok(Signal::Int | Signal::Term) => return,
            Ok(signal) => log::info!(signal:? = signal; "stopping: signal ignored"),
            Err(e) => log::warn!(err:% = e; "reading signals failed"),
        }
    }
    futures::future::pending::<()>().await
}
