//! The relayd daemon: arguments → config → logger → relay until SIGINT/SIGTERM (a second one
//! forces the close) → exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use async_signal::{Signal, Signals};
use futures::StreamExt;
use relayd::logging::{self, Format};
use relayd::{Config, Relay, ShutdownReport, StartError, rt};

const USAGE: &str =
    "usage: relayd [--config PATH] [--check] [--log-level LEVEL] [--log-format auto|pretty|json] [--version]

  --config PATH       RON config file (default: config/relayd.ron)
  --check             validate the config and exit (0 when valid)
  --log-level LEVEL   error, warn, info, debug or trace (overrides the config's log_level)
  --log-format FMT    pretty on a terminal and json otherwise (auto, the default), or as given";

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
                    println!("relayd {}", env!("CARGO_PKG_VERSION"));
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(Some(parsed))
    }
}

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
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
    match rt::block_on(serve(settings, signals)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!(err:% = e; "cannot start");
            ExitCode::FAILURE
        }
    }
}

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

/// Runs the relay until SIGINT or SIGTERM, then drains it; a second one closes live sessions
/// at once.
async fn serve(settings: relayd::Settings, signals: std::io::Result<Signals>) -> Result<ShutdownReport, StartError> {
    let relay = Relay::with_settings(settings)?;
    let mut signals = match signals {
        Ok(signals) => signals,
        Err(e) => {
            // Without a handler the default action (exit) still stops the process.
            log::warn!(err:% = e; "cannot handle signals: SIGINT and SIGTERM will end the process at once");
            return futures::future::pending().await;
        }
    };
    asked_to_stop(&mut signals).await;
    Ok(relay.shutdown_or(asked_to_stop(&mut signals)).await)
}

/// Completes on the next SIGINT or SIGTERM. SIGHUP (a service manager's reload, a closed
/// terminal) and SIGUSR1 never stop the daemon.
async fn asked_to_stop(signals: &mut Signals) {
    while let Some(signal) = signals.next().await {
        match signal {
            Ok(signal @ (Signal::Hup | Signal::Usr1)) => {
                log::warn!(signal:? = signal; "reload is not supported yet: the running config is unchanged")
            }
            Ok(signal) => {
                log::info!(signal:? = signal; "signal received");
                return;
            }
            Err(e) => log::warn!(err:% = e; "reading signals failed"),
        }
    }
    futures::future::pending::<()>().await
}
