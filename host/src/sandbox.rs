//! The sandbox: the host's wasmtime engines, handler components compiled and
//! pre-instantiated once per version, and a fresh, limited Store for every call.
//!
//! Code comes in two [`Tier`]s, each from an engine (and linker) of its own. The
//! optimised engine (Cranelift, pooling allocator) builds the code calls run on in
//! steady state, and only its code is cached. The baseline engine (Winch, wasmtime's
//! single-pass compiler) builds a large new component in a fraction of that time, into
//! slower code, so that it serves at once; the optimiser then compiles the optimised
//! build in the background and the registry swaps it in.
//!
//! A call gets a fresh instance from the version's `DeviceHandlerPre`, a deadline, a
//! linear-memory cap enforced by a resource limiter, and WASI with nothing granted: no
//! files, network, environment, arguments or stdin. What the handler prints or logs is
//! captured, capped and logged, tagged with the method and request. A large handler
//! whose instances take long to make (a Python one: about half a millisecond) gets them made
//! ahead of its calls, on the preparers' threads, each still serving one call only.
//!
//! Calls run as futures (wasmtime's async support, WASI linked async), so a deadline
//! holds wherever the handler spends its time: running wasm yields to the executor at
//! every epoch tick and traps once its deadline has passed, and a handler blocked in a
//! host call (a WASI sleep or poll) is dropped at the deadline, its Store with it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, mpsc};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::error::Context as _;
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreContextMut, Strategy,
    Trap, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::cache::CompileCache;
use crate::call::{CallError, HandlerContext};
use crate::guest_io::{HandlerLog, LogStream};

/// The bindings of the handler world, generated once; only what the host uses leaves.
mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "device-handler",
        // Calls are futures: the deadline can drop one blocked in a host call. The
        // host interface itself (log, device-id, config-get) never waits, so it stays
        // synchronous.
        exports: { default: async },
    });
}

use bindings::edge::methods::host::{self as host_api, Level};
pub use bindings::exports::edge::methods::handler::{MethodInfo, Request, Response};
use bindings::{DeviceHandler, DeviceHandlerPre};

/// Bytes of linear memory (and of tables) a pool slot keeps resident between
/// instances, reset page by page; see [`engine`].
const KEEP_RESIDENT: usize = 2 * 1024 * 1024;

/// How often the epoch advances while wasm may run: how often running wasm yields to
/// the executor, and the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// How long a handler may take to list its methods when it is loaded.
const LOAD_DEADLINE: Duration = Duration::from_secs(2);

/// The pauses before each new attempt to make a component's memory images, when the
/// kernel refuses to seal one as busy (see [`make_memory_images`]).
const IMAGE_RETRY_WAITS: [Duration; 4] = [
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_millis(500),
];

/// The smallest component built by the baseline compiler first. Cranelift compiles a
/// component of this size in about a tenth of a second (a Rust handler is 40-110 KB);
/// the components of interpreted languages (12-18 MB, the interpreter inside) take
/// seconds, and those are what the baseline build is for.
pub const BASELINE_MIN_BYTES: usize = 1024 * 1024;

/// Whether `wasm` is a large component (see [`BASELINE_MIN_BYTES`]): one built by the
/// baseline compiler first, and whose fresh instances may be made ahead of its calls.
fn is_large(wasm: &[u8]) -> bool {
    wasm.len() >= BASELINE_MIN_BYTES
}

/// Fresh instances of a large handler (see [`BASELINE_MIN_BYTES`]) kept instantiated
/// ahead of its calls, per version; see [`HandlerCode::call`].
const PREPARED_MAX: usize = 2;

/// A large handler's instances are made ahead of its calls when its first
/// [`PREPARE_SAMPLES`] calls took at least this long, on average, to instantiate.
const PREPARE_MIN_US: u64 = 250;

/// How many of a large handler's first calls decide whether to make its instances
/// ahead.
const PREPARE_SAMPLES: usize = 4;

/// Threads instantiating large handlers ahead of their calls.
const PREPARERS: usize = 2;

/// How long a handler's start-up may take when it is instantiated ahead of a call.
const PREPARE_DEADLINE: Duration = Duration::from_secs(5);

/// Host-wide sandbox settings.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Instances that may exist at once (calls in flight plus loads); sizes the pool.
    pub max_instances: u32,
    /// The largest linear memory any handler may be granted, in bytes.
    pub max_memory: usize,
    /// Where compiled code is cached; none compiles every load.
    pub cache_dir: Option<PathBuf>,
    /// Whether pool slots keep their pages mapped between instances (where the
    /// kernel supports resetting only the dirty ones); on unless measuring without.
    pub keep_resident: bool,
    /// Whether a large new component (see [`BASELINE_MIN_BYTES`]) whose optimised
    /// code is not cached serves first from a baseline build.
    pub baseline: bool,
}

/// Which compiler built a version's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Winch, wasmtime's baseline compiler: quick to compile, slower to run. Serves a
    /// version only until its optimised build is ready; never cached.
    Baseline,
    /// Cranelift: the code calls run on in steady state, and the code that is cached.
    Optimised,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Baseline => "baseline",
            Self::Optimised => "optimised",
        })
    }
}

/// An engine and the linker that gives handlers the host's imports in it: code,
/// linkers and pre-instances of one engine cannot be used with another.
struct Compiler {
    tier: Tier,
    engine: Engine,
    linker: Linker<CallState>,
}

impl Compiler {
    /// The linker of `engine` (WASI p2 and the host interface), and the engine given to
    /// the process's epoch [`Ticker`].
    fn new(tier: Tier, engine: Engine) -> wasmtime::Result<Self> {
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).context("linking WASI")?;
        DeviceHandler::add_to_linker::<_, HasSelf<CallState>>(&mut linker, |state| state)
            .context("linking the host interface")?;
        Ticker::global().add(&engine);
        Ok(Self {
            tier,
            engine,
            linker,
        })
    }
}

/// The engines and linkers every handler version is compiled and linked with.
pub struct Sandbox {
    /// Cranelift, pooling allocator: the steady-state code.
    optimised: Compiler,
    /// Winch, when a large new component may serve from a baseline build first.
    baseline: Option<Compiler>,
    cache: Option<CompileCache>,
    compilations: AtomicU64,
    /// The largest linear memory the pool can give one instance.
    max_memory: usize,
}

impl Sandbox {
    /// Builds the optimised engine (Cranelift, pooling allocator, epoch interruption)
    /// and, when `config.baseline` is set, the baseline engine (Winch, instances
    /// allocated on demand: it serves briefly, so it reserves no pool of its own), each
    /// with its linker (WASI p2 and the host interface) and epoch ticker.
    ///
    /// # Errors
    /// When wasmtime refuses the configuration (for example the pool cannot be
    /// reserved in this process's address space).
    pub fn new(config: &SandboxConfig) -> wasmtime::Result<Self> {
        let engine = match engine(config, config.keep_resident) {
            Ok(engine) => engine,
            Err(error) => {
                tracing::info!(%error, "PAGEMAP_SCAN is not available (Linux 6.7+); fresh instances will page-fault their memory in");
                engine(config, false)?
            }
        };
        let cache = config
            .cache_dir
            .clone()
            .map(|dir| CompileCache::new(dir, &engine));
        let optimised = Compiler::new(Tier::Optimised, engine)?;
        let baseline = if config.baseline {
            Some(Compiler::new(Tier::Baseline, baseline_engine()?)?)
        } else {
            None
        };
        Ok(Self {
            optimised,
            baseline,
            cache,
            compilations: AtomicU64::new(0),
            max_memory: config.max_memory,
        })
    }

    /// How many components this sandbox has compiled into optimised code (rather than
    /// taken from the compiled-code cache); baseline builds are not counted.
    pub fn compilations(&self) -> u64 {
        self.compilations.load(Ordering::Relaxed)
    }

    /// The optimised component of `wasm` (whose digest is `digest`) if the cache has
    /// a sound entry for it.
    fn cached(&self, digest: &str) -> Option<Component> {
        let component = self.cache.as_ref()?.get(&self.optimised.engine, digest)?;
        tracing::debug!(%digest, "compiled code taken from the cache");
        Some(component)
    }

    /// The optimised component of `wasm`: from the cache when a sound entry is there,
    /// else compiled, and cached for next time.
    fn optimised_component(&self, wasm: &[u8], digest: &str) -> wasmtime::Result<Component> {
        if let Some(component) = self.cached(digest) {
            return Ok(component);
        }
        let component =
            Component::new(&self.optimised.engine, wasm).context("not a valid component")?;
        self.compilations.fetch_add(1, Ordering::Relaxed);
        if let Some(cache) = &self.cache {
            cache.put(digest, &component);
        }
        Ok(component)
    }

    /// The quickest build of `wasm` that can serve, and the compiler it is of: the
    /// optimised code from the cache; else, for a large component with the baseline
    /// compiler on, a baseline build; else the optimised build, compiled now. A
    /// component the baseline compiler refuses (a feature Winch lacks) is compiled
    /// optimised now, with a note in the log.
    fn first_component(
        &self,
        wasm: &[u8],
        digest: &str,
    ) -> wasmtime::Result<(&Compiler, Component)> {
        if let Some(component) = self.cached(digest) {
            return Ok((&self.optimised, component));
        }
        if let Some(baseline) = self.baseline.as_ref().filter(|_| is_large(wasm)) {
            match Component::new(&baseline.engine, wasm) {
                Ok(component) => return Ok((baseline, component)),
                Err(error) => tracing::info!(
                    %digest, error = %format!("{error:#}"),
                    "the baseline compiler cannot build this component; compiling the optimised build before it serves"
                ),
            }
        }
        Ok((&self.optimised, self.optimised_component(wasm, digest)?))
    }

    /// Builds a handler version's code as soon as it can serve (see
    /// [`HandlerCode::tier`]): the optimised code from the cache by `digest`, else a
    /// baseline build of a large component (then run [`Sandbox::optimise`] for the
    /// code to serve in steady state), else the optimised build, compiled and cached.
    /// Pre-instantiates it against the linker, and asks it once which methods it serves.
    ///
    /// # Errors
    /// When the handler asks for more memory than the host allows, a granted folder
    /// cannot be opened, the bytes are not a component, the component imports
    /// something the host does not give, does not export the `edge:methods/handler`
    /// interface, traps while listing its methods, or lists an invalid or duplicate
    /// method name.
    pub fn load(
        &self,
        wasm: &[u8],
        digest: &str,
        context: HandlerContext,
    ) -> wasmtime::Result<HandlerCode> {
        if context.max_memory > self.max_memory {
            wasmtime::bail!(
                "max_memory {} MiB is over the host's limit of {} MiB (handler_defaults.max_memory in the host's config)",
                context.max_memory >> 20,
                self.max_memory >> 20
            );
        }
        if let Err(error) = context.grants.check() {
            wasmtime::bail!("invalid grants: {error:#}");
        }
        let started = Instant::now();
        let (compiler, component) = self.first_component(wasm, digest)?;
        let built_ms = started.elapsed().as_millis();
        let code = prepare(compiler, &component, Arc::new(context), is_large(wasm))?;
        tracing::debug!(
            %digest, code = %compiler.tier, built_ms,
            prepare_ms = started.elapsed().as_millis() - built_ms,
            "handler code built (compiled, or taken from the cache) and prepared \
             (pre-instantiated, its methods listed)"
        );
        Ok(code)
    }

    /// The optimised build of a version that serves from `baseline` code (see
    /// [`Sandbox::load`]): compiled now, or taken from the cache should another host
    /// have put it there meanwhile; cached; pre-instantiated with the same context.
    /// Blocks for as long as Cranelift takes (seconds for a large component).
    ///
    /// # Errors
    /// As [`Sandbox::load`], should the optimised build fail where the baseline one
    /// did not.
    pub fn optimise(
        &self,
        wasm: &[u8],
        digest: &str,
        baseline: &HandlerCode,
    ) -> wasmtime::Result<HandlerCode> {
        let component = self.optimised_component(wasm, digest)?;
        prepare(
            &self.optimised,
            &component,
            Arc::clone(&baseline.context),
            is_large(wasm),
        )
    }
}

/// Pre-instantiates `component` against `compiler`'s linker and asks it once which
/// methods it serves. With `ahead` (a large component, without reuse), its fresh
/// instances are instantiated ahead of its calls.
fn prepare(
    compiler: &Compiler,
    component: &Component,
    context: Arc<HandlerContext>,
    ahead: bool,
) -> wasmtime::Result<HandlerCode> {
    let pre = match compiler.linker.instantiate_pre(component) {
        Ok(pre) => pre,
        Err(error) => return Err(missing_imports(&compiler.engine, component, error)),
    };
    let pre = DeviceHandlerPre::new(pre)
        .context("the component does not implement the edge:methods handler world")?;
    make_memory_images(component)?;
    let methods = list_methods(&compiler.engine, &pre, &context)
        .context("listing the handler's methods failed")?;
    check_methods(&methods)?;
    Ok(HandlerCode {
        tier: compiler.tier,
        engine: compiler.engine.clone(),
        pre,
        prepared: (ahead && context.reuse.is_none()).then(Arc::default),
        context,
        methods,
        warm: Mutex::new(Vec::new()),
    })
}

/// Makes `component`'s copy-on-write memory images now rather than in its first
/// instantiation, retrying while the kernel refuses to seal one as busy.
///
/// On Linux wasmtime copies a compiled (not cached) component's initial memories into
/// memfds and seals them read-only. Sealing against writes waits up to about 150 ms
/// for the kernel's transient references to the new pages to go, then fails with
/// EBUSY: on this project's 2-core VMs about one 12 MB image in a thousand, and a
/// Python handler failed to load in CI for it. A failed attempt keeps nothing, and the
/// next one (after [`IMAGE_RETRY_WAITS`]) has succeeded every time it was tried.
fn make_memory_images(component: &Component) -> wasmtime::Result<()> {
    let mut waits = IMAGE_RETRY_WAITS.iter();
    loop {
        let error = match component.initialize_copy_on_write_image() {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        match waits.next() {
            Some(wait) if is_busy(&error) => {
                tracing::warn!(
                    error = %error.root_cause(),
                    retry_in_ms = wait.as_millis(),
                    "the kernel refused to seal a memory image of the handler (busy); trying again"
                );
                std::thread::sleep(*wait);
            }
            _ => return Err(error.context("making the handler's initial memory images failed")),
        }
    }
}

/// Whether `error` comes from an OS call that failed with EBUSY, at any depth.
fn is_busy(error: &wasmtime::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ResourceBusy)
    })
}

/// The packages whose interfaces the host links (WASI 0.2 through wasmtime-wasi, and
/// the handler's own host interface); an import from anywhere else cannot be given.
const LINKED_PACKAGES: &[&str] = &[
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:io/",
    "wasi:random/",
    "wasi:sockets/",
    "edge:methods/",
];

/// The load failure of a component the linker cannot satisfy: the imports the host
/// does not give, by name, and what to do about them (wasmtime's own message follows
/// as the cause).
fn missing_imports(
    engine: &Engine,
    component: &Component,
    error: wasmtime::Error,
) -> wasmtime::Error {
    let missing: Vec<String> = component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_owned())
        .filter(|name| {
            !LINKED_PACKAGES
                .iter()
                .any(|package| name.starts_with(package))
        })
        .collect();
    if missing.is_empty() {
        // Known packages at a version or shape the host does not link.
        return error.context(
            "the component's imports do not match what the host gives (WASI 0.2 and \
             edge:methods/host@0.1.0, see wit/handler.wit)",
        );
    }
    let hint = if missing.iter().any(|name| name.starts_with("wasi:http/")) {
        "; the host grants no network. A componentize-js build imports wasi:http unless \
         built with disableFeatures: [\"http\", \"fetch-event\"] (see docs/handlers.md)"
    } else {
        "; the host gives only WASI 0.2 (cli, clocks, filesystem, io, random, sockets) and \
         edge:methods/host: build the handler against wit/handler.wit's world"
    };
    error.context(format!(
        "the component imports what the host does not give: {}{hint}",
        missing.join(", ")
    ))
}

/// Instantiates a freshly loaded handler and asks it which methods it serves, within
/// [`LOAD_DEADLINE`] however it spends it (running, or blocked in a host call). Runs
/// on a runtime of its own: loading happens on a blocking thread, never an async one.
fn list_methods(
    engine: &Engine,
    pre: &DeviceHandlerPre<CallState>,
    context: &Arc<HandlerContext>,
) -> wasmtime::Result<Vec<MethodInfo>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .context("starting a runtime to load the handler")?;
    let _running = Ticker::global().running();
    let mut store = new_store(engine, context, "(load)", "-", LOAD_DEADLINE)
        .map_err(|e| wasmtime::format_err!("{e}"))?;
    // The deadline's timer is made inside the runtime: on its clock, not a caller's.
    let listed = runtime.block_on(async {
        tokio::time::timeout(LOAD_DEADLINE, async {
            let handler = pre.instantiate_async(&mut store).await?;
            handler
                .edge_methods_handler()
                .call_methods(&mut store)
                .await
        })
        .await
    });
    settle(listed, &store, LOAD_DEADLINE).map_err(|e| wasmtime::format_err!("{e}"))
}

/// The engine: pooling allocator sized for `config`, epoch interruption on. With
/// `keep_resident`, pool slots keep their last instance's pages mapped and reset only
/// the dirty ones, found with the kernel's PAGEMAP_SCAN: a fresh instance then starts
/// without page faults on the pages a handler usually touches. It needs the ioctl
/// (`Enabled::Yes` fails without it): resetting the whole kept prefix by `memset`
/// instead would cost more than the faults it saves.
fn engine(config: &SandboxConfig, keep_resident: bool) -> wasmtime::Result<Engine> {
    let instances = config.max_instances.max(1);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(instances)
        // A Rust wasip2 component is a handful of core instances (the program and
        // the adapter shims), each with at most one memory and a few tables.
        .total_core_instances(instances * 8)
        .total_memories(instances * 2)
        .total_tables(instances * 8)
        .max_memory_size(config.max_memory)
        // Every call runs on a fiber of its own (async support): one stack per instance.
        .total_stacks(instances);
    if keep_resident {
        pool.linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Yes);
    }
    let mut engine_config = base_config();
    engine_config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&engine_config).context("configuring wasmtime")
}

/// What both engines share: epoch interruption, and no component-model concurrency.
/// Handlers are WASI p2 components whose calls run on a fiber each; with concurrency
/// support on (wasmtime's default), every call would instead go through the
/// component-model-async task machinery (a guest task, a oneshot channel, thread
/// cleanup): off, `edge-bench sandbox` measured a fresh call 2x and a reused
/// instance's call 3x faster.
fn base_config() -> wasmtime::Config {
    let mut engine_config = wasmtime::Config::new();
    engine_config
        .epoch_interruption(true)
        .concurrency_support(false);
    engine_config
}

/// The baseline engine: Winch, epoch interruption on (Winch checks the epoch as
/// Cranelift does, so deadlines hold). Instances are allocated on demand rather than
/// from a pool: baseline code serves a version for seconds, and a second pool would
/// reserve as much address space again for the whole life of the host.
fn baseline_engine() -> wasmtime::Result<Engine> {
    let mut engine_config = base_config();
    // Winch compiles the functions, but Cranelift still compiles the trampolines of
    // every escaping function and the component's adapters: thousands in CPython. The
    // quickest Cranelift (no optimisation, the single-pass register allocator) took a
    // large Python handler's baseline build from 2.3 s to 1.9 s; these few seconds
    // of code run no slower for it that a call would notice.
    engine_config
        .strategy(Strategy::Winch)
        .cranelift_opt_level(wasmtime::OptLevel::None)
        .cranelift_regalloc_algorithm(wasmtime::RegallocAlgorithm::SinglePass);
    Engine::new(&engine_config).context("configuring wasmtime's baseline compiler (Winch)")
}

/// A fresh Store for one call: WASI with only what the handler's grants give, its
/// output going to the log, its memory capped, its deadline set.
fn new_store(
    engine: &Engine,
    context: &Arc<HandlerContext>,
    method: &str,
    request_id: &str,
    deadline: Duration,
) -> Result<Store<CallState>, CallError> {
    let method: Arc<str> = Arc::from(method);
    let request_id: Arc<str> = Arc::from(request_id);
    let log = HandlerLog::new(context, &method, &request_id);
    let stdout = LogStream::new("stdout", context, &method, &request_id);
    let stderr = LogStream::new("stderr", context, &method, &request_id);
    let mut wasi = WasiCtx::builder();
    wasi.stdout(stdout.clone()).stderr(stderr.clone());
    context
        .grants
        .apply(&mut wasi)
        .map_err(|e| CallError::Trapped(format!("{e:#}")))?;
    let state = CallState {
        wasi: wasi.build(),
        table: ResourceTable::new(),
        limiter: MemoryLimiter {
            max: context.max_memory,
            exhausted: false,
        },
        context: Arc::clone(context),
        deadline: Instant::now() + deadline,
        log,
        stdout,
        stderr,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limiter);
    store.epoch_deadline_callback(at_epoch_tick);
    store.set_epoch_deadline(1);
    Ok(store)
}

/// At every epoch tick while wasm runs: trap once the call's deadline has passed,
/// else let the executor run other tasks (and the deadline's timer fire) before going
/// on. A handler that computes for long thus never holds the event loop (or a worker
/// of the pool, with `--threads`) for more than a tick.
fn at_epoch_tick(store: StoreContextMut<'_, CallState>) -> wasmtime::Result<UpdateDeadline> {
    Ok(if Instant::now() >= store.data().deadline {
        UpdateDeadline::Interrupt
    } else {
        UpdateDeadline::Yield(1)
    })
}

/// Advances the epoch of every engine it was given, every [`EPOCH_TICK`], while wasm
/// runs in any of them ([`Ticker::running`]), on a thread of its own. While none does,
/// the thread stays parked: an idle host is not woken 200 times a second per engine.
struct Ticker {
    engines: Mutex<Vec<wasmtime::EngineWeak>>,
    /// How many [`Running`] guards are held.
    running: AtomicUsize,
    /// How many times the epoch advanced.
    ticks: AtomicU64,
    thread: OnceLock<std::thread::Thread>,
}

/// Held while wasm may run: the epoch advances until the last one is dropped.
struct Running<'t>(&'t Ticker);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Ticker {
    /// A ticker with its thread started.
    fn start() -> Arc<Self> {
        let ticker = Arc::new(Self {
            engines: Mutex::new(Vec::new()),
            running: AtomicUsize::new(0),
            ticks: AtomicU64::new(0),
            thread: OnceLock::new(),
        });
        let weak = Arc::downgrade(&ticker);
        let spawned = std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || Self::run(&weak));
        match spawned {
            Ok(handle) => {
                let _ = ticker.thread.set(handle.thread().clone());
            }
            // Without the ticker no deadline fires: say so loudly, but the host can serve.
            Err(e) => {
                tracing::error!(error = %e, "could not start the epoch ticker; call deadlines will not be enforced");
            }
        }
        ticker
    }

    /// The process's ticker, which every engine's epoch is advanced by.
    fn global() -> &'static Self {
        static TICKER: OnceLock<Arc<Ticker>> = OnceLock::new();
        TICKER.get_or_init(Self::start)
    }

    /// Advances `engine`'s epoch too, for as long as it lives.
    fn add(&self, engine: &Engine) {
        self.engines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(engine.weak());
    }

    /// Makes the epoch advance until the guard is dropped: taken before any wasm
    /// runs (instantiating runs it too), or a handler that spins could never be
    /// stopped.
    fn running(&self) -> Running<'_> {
        if self.running.fetch_add(1, Ordering::AcqRel) == 0
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
        Running(self)
    }

    fn run(ticker: &std::sync::Weak<Self>) {
        loop {
            let Some(this) = ticker.upgrade() else {
                return;
            };
            if this.running.load(Ordering::Acquire) == 0 {
                drop(this);
                // Woken by the next `running`, or spuriously: either way, look again.
                std::thread::park();
                continue;
            }
            drop(this);
            std::thread::sleep(EPOCH_TICK);
            let Some(this) = ticker.upgrade() else {
                return;
            };
            if this.running.load(Ordering::Acquire) > 0 {
                this.engines
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|weak| {
                        weak.upgrade()
                            .map(|engine| engine.increment_epoch())
                            .is_some()
                    });
                this.ticks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        // Lets a parked thread see that the ticker is gone, and end.
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
}

fn check_methods(methods: &[MethodInfo]) -> wasmtime::Result<()> {
    if methods.is_empty() {
        wasmtime::bail!("the handler serves no methods");
    }
    let mut seen = std::collections::HashSet::new();
    for method in methods {
        edge_proto::topic::check_method(&method.name)
            .with_context(|| format!("the handler lists an invalid method {:?}", method.name))?;
        if !seen.insert(method.name.as_str()) {
            wasmtime::bail!("the handler lists method {:?} twice", method.name);
        }
    }
    Ok(())
}

/// One compiled, pre-instantiated handler version.
pub struct HandlerCode {
    /// Which compiler built it.
    tier: Tier,
    /// The engine it was built by: its Stores must be of the same.
    engine: Engine,
    pre: DeviceHandlerPre<CallState>,
    context: Arc<HandlerContext>,
    methods: Vec<MethodInfo>,
    /// Idle warm instances, for handlers that opted in to reuse. They belong to this
    /// version: a reload retires them with it.
    warm: Mutex<Vec<Warm>>,
    /// Fresh instances made ahead of calls, for a large handler without reuse.
    prepared: Option<Arc<Prepared>>,
}

/// A large handler's fresh instances, instantiated ahead of its calls on the
/// preparer's thread. Each serves one call, as any fresh instance does: it was never
/// used before, and shares nothing with any other. Instantiating one is half of a fresh
/// call to such a handler (for a componentize-py handler: its start-up fills CPython's
/// function tables), and made ahead it is off the call's path.
#[derive(Default)]
struct Prepared {
    /// Instances ready for a call, at most [`PREPARED_MAX`].
    ready: Mutex<Vec<Warm>>,
    /// Instances asked of the preparer and not yet ready.
    making: AtomicUsize,
    /// Calls waiting for one of those rather than instantiating their own.
    waiting: AtomicUsize,
    /// The first calls' own instantiations, in microseconds, and how many: whether
    /// instantiating is worth moving off the calls' path is decided on them.
    sampled_us: AtomicU64,
    samples: AtomicUsize,
    /// Wakes the waiting calls when an instance is ready (or failed).
    arrived: tokio::sync::Notify,
    /// Set when making one failed (the handler traps or times out as it starts): its
    /// calls then instantiate inline, where the failure is the call's answer.
    failed: AtomicBool,
}

impl Prepared {
    fn take(&self) -> Option<Warm> {
        self.ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    /// An instance for a call: a ready one, or one on its way, which comes sooner than
    /// one the call would make itself. None when none is ready and the ones on their
    /// way are already awaited by other calls (under load the call instantiates its
    /// own, beside the preparer), or when `expires` passes first.
    async fn get(&self, expires: tokio::time::Instant) -> Option<Warm> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(instance) = self.take() {
                return Some(instance);
            }
            if self.failed.load(Ordering::Relaxed)
                || self.waiting.load(Ordering::Relaxed) >= self.making.load(Ordering::Relaxed)
            {
                return None;
            }
            let _waiting = Waiting::count(&self.waiting);
            tokio::time::timeout_at(expires, arrived).await.ok()?;
        }
    }

    /// Counts one of the first calls' own instantiations; the last of them decides,
    /// and the log says what.
    fn measured(&self, took: Duration, context: &HandlerContext) {
        if self.samples.load(Ordering::Relaxed) >= PREPARE_SAMPLES {
            return;
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sampled_us.fetch_add(micros, Ordering::Relaxed);
        if self.samples.fetch_add(1, Ordering::Relaxed) + 1 == PREPARE_SAMPLES {
            let instantiate_us = self.sampled_us.load(Ordering::Relaxed) / PREPARE_SAMPLES as u64;
            if self.worth_it() {
                tracing::info!(
                    handler = %context.file, instantiate_us,
                    "this handler's fresh instances are made ahead of its calls, on the preparers' threads"
                );
            } else {
                tracing::debug!(
                    handler = %context.file, instantiate_us,
                    "this handler instantiates quickly: each call makes its own fresh instance"
                );
            }
        }
    }

    /// Whether the first calls' instantiations took long enough, on average, to be
    /// made ahead: a JavaScript handler instantiates in tens of microseconds (its
    /// engine starts in its first call), a Python one in about half a millisecond.
    fn worth_it(&self) -> bool {
        let samples = self.samples.load(Ordering::Relaxed);
        samples >= PREPARE_SAMPLES
            && self.sampled_us.load(Ordering::Relaxed) / samples as u64 >= PREPARE_MIN_US
    }

    /// Asks the preparer for another instance, unless enough are ready or on the way.
    fn refill(self: &Arc<Self>, code: &HandlerCode) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        let ready = self
            .ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        if ready + self.making.load(Ordering::Relaxed) >= PREPARED_MAX {
            return;
        }
        self.making.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            engine: code.engine.clone(),
            pre: code.pre.clone(),
            context: Arc::clone(&code.context),
            into: Arc::clone(self),
        };
        if preparer().send(job).is_err() {
            // The preparers are gone (the job, dropped, is no longer counted): calls
            // instantiate their own.
            self.failed.store(true, Ordering::Relaxed);
        }
    }
}

/// Counts a waiting call for as long as it waits, even if the call is dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::Relaxed);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An instance for the preparer to make. Made or not (a preparer gone), it is no
/// longer on its way once the job is dropped, and the waiting calls are told.
struct Job {
    engine: Engine,
    pre: DeviceHandlerPre<CallState>,
    context: Arc<HandlerContext>,
    into: Arc<Prepared>,
}

impl Job {
    /// Makes the instance, on the preparer's runtime, and adds it to what is ready. A
    /// version retired meanwhile is the only holder of `into` left: the instance is
    /// dropped with it.
    async fn run(&self) {
        let outcome = async {
            let _running = Ticker::global().running();
            let mut store = new_store(
                &self.engine,
                &self.context,
                "(prepared)",
                "-",
                PREPARE_DEADLINE,
            )?;
            let instantiated =
                tokio::time::timeout(PREPARE_DEADLINE, self.pre.instantiate_async(&mut store))
                    .await;
            let handler = settle(instantiated, &store, PREPARE_DEADLINE)?;
            Ok::<_, CallError>(Warm {
                store,
                handler,
                calls: 0,
            })
        }
        .await;
        match outcome {
            Ok(instance) => self
                .into
                .ready
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(instance),
            Err(error) => {
                tracing::debug!(%error, "instantiating a handler ahead of its calls failed; its calls instantiate their own");
                self.into.failed.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.into.making.fetch_sub(1, Ordering::Relaxed);
        self.into.arrived.notify_waiters();
    }
}

/// The preparer: [`PREPARERS`] threads for the process, each with a runtime of its
/// own, making the instances asked for. On a machine with more than one CPU they
/// instantiate while the event loop serves.
fn preparer() -> &'static mpsc::Sender<Job> {
    static PREPARER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    PREPARER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..PREPARERS {
            let queue = Arc::clone(&queue);
            let spawned = std::thread::Builder::new()
                .name(format!("instance-preparer-{n}"))
                .spawn(move || prepare_ahead(&queue));
            if let Err(error) = spawned {
                tracing::error!(%error, "cannot start an instance preparer");
            }
        }
        jobs
    })
}

/// A preparer's thread: makes the instances asked for, one after another, until the
/// process ends.
fn prepare_ahead(queue: &Mutex<mpsc::Receiver<Job>>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start an instance preparer's runtime");
            return;
        }
    };
    loop {
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match job {
            Ok(job) => runtime.block_on(job.run()),
            Err(_) => return,
        }
    }
}

/// What a finished fresh call leaves behind: its instance, torn down when this is
/// dropped. Tearing down costs about as much as the call itself, so the host drops it
/// once the answer is queued rather than before.
pub struct Spent {
    _store: Option<Store<CallState>>,
}

/// An instance kept warm between calls, with the Store it lives in.
struct Warm {
    store: Store<CallState>,
    handler: DeviceHandler,
    /// Calls it has served.
    calls: u32,
}

impl Warm {
    /// Readies this kept instance (warm, or made ahead) for `request`: its output
    /// tagged with the call, its deadline set afresh.
    fn start_call(&mut self, request: &Request, deadline: Duration) {
        self.store.data_mut().start_call(request, deadline);
        self.store.set_epoch_deadline(1);
    }
}

/// Idle warm instances kept per handler version; more are dropped when calls end.
const WARM_MAX: usize = 8;

impl HandlerCode {
    /// The methods this version serves, as it listed them when loaded.
    pub fn methods(&self) -> &[MethodInfo] {
        &self.methods
    }

    /// Which compiler built it: baseline code serves only until the optimised build
    /// of the same version replaces it.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// Runs one call: in a fresh instance (made ahead of the call for a large handler
    /// that instantiates slowly, see [`Prepared`]), or in a warm one when the handler
    /// opted in to reuse, for at most `deadline`. Running wasm yields to the executor at every
    /// epoch tick, so the call can be awaited on any async thread. The answer comes with
    /// the call's fresh instance: drop it after the answer is on its way.
    ///
    /// # Errors
    /// When the handler does not finish within `deadline` (running, or blocked in a
    /// host call), exhausts its memory, or traps; none of these affect any other call,
    /// and the instance it happened in is never used again.
    pub async fn call(
        &self,
        request: &Request,
        deadline: Duration,
    ) -> Result<(Response, Spent), CallError> {
        let _running = Ticker::global().running();
        let expires = tokio::time::Instant::now() + deadline;
        let Some(max_calls) = self.context.reuse else {
            return self.call_fresh(request, deadline, expires).await;
        };
        let idle = self
            .warm
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut warm = match idle {
            Some(mut warm) => {
                warm.start_call(request, deadline);
                warm
            }
            None => {
                let mut store = self.fresh_store(request, deadline)?;
                let instantiated =
                    tokio::time::timeout_at(expires, self.pre.instantiate_async(&mut store)).await;
                let handler = settle(instantiated, &store, deadline)?;
                Warm {
                    store,
                    handler,
                    calls: 0,
                }
            }
        };
        let handled = tokio::time::timeout_at(
            expires,
            warm.handler
                .edge_methods_handler()
                .call_handle(&mut warm.store, request),
        )
        .await;
        // A trap, a deadline or exhausted memory: the instance is dropped here.
        let response = settle(handled, &warm.store, deadline)?;
        warm.calls += 1;
        if warm.calls < max_calls {
            let mut idle = self.warm.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < WARM_MAX {
                idle.push(warm);
            }
        }
        Ok((response, Spent { _store: None }))
    }

    /// Runs one call in a fresh instance: one made ahead when there is one (see
    /// [`Prepared`]), else one instantiated now.
    async fn call_fresh(
        &self,
        request: &Request,
        deadline: Duration,
        expires: tokio::time::Instant,
    ) -> Result<(Response, Spent), CallError> {
        let ready = match &self.prepared {
            // Until its first calls have shown instantiating to be slow, and for good
            // when they showed it quick, calls make their own.
            Some(prepared) if prepared.worth_it() => {
                let ready = prepared.get(expires).await;
                prepared.refill(self);
                ready
            }
            _ => None,
        };
        let (mut store, handler) = match ready {
            Some(mut ready) => {
                ready.start_call(request, deadline);
                (ready.store, Some(ready.handler))
            }
            None => (self.fresh_store(request, deadline)?, None),
        };
        let handled = tokio::time::timeout_at(expires, async {
            let handler = match handler {
                Some(handler) => handler,
                None => {
                    let started = Instant::now();
                    let handler = self.pre.instantiate_async(&mut store).await?;
                    if let Some(prepared) = &self.prepared {
                        prepared.measured(started.elapsed(), &self.context);
                    }
                    handler
                }
            };
            handler
                .edge_methods_handler()
                .call_handle(&mut store, request)
                .await
        })
        .await;
        let response = settle(handled, &store, deadline)?;
        Ok((
            response,
            Spent {
                _store: Some(store),
            },
        ))
    }

    /// A fresh Store for `request`.
    fn fresh_store(
        &self,
        request: &Request,
        deadline: Duration,
    ) -> Result<Store<CallState>, CallError> {
        new_store(
            &self.engine,
            &self.context,
            &request.method,
            &request.request_id,
            deadline,
        )
    }
}

/// What a step of a call bounded by its deadline came to, as a call failure: the
/// deadline's timer fired (the handler was blocked in a host call), or wasm failed.
fn settle<T>(
    outcome: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>,
    store: &Store<CallState>,
    deadline: Duration,
) -> Result<T, CallError> {
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(describe_failure(error, store, deadline)),
        Err(_) => Err(CallError::Deadline(deadline)),
    }
}

/// Turns a wasmtime error into the call failure it stands for.
fn describe_failure(
    error: wasmtime::Error,
    store: &Store<CallState>,
    deadline: Duration,
) -> CallError {
    if store.data().limiter.exhausted {
        return CallError::MemoryExhausted {
            limit: store.data().limiter.max,
        };
    }
    tracing::debug!(error = ?error, "handler failure in full");
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => CallError::Deadline(deadline),
        // The trap itself says what happened; the wasm backtrace stays in the debug log.
        Some(trap) => CallError::Trapped(trap.to_string()),
        None => CallError::Trapped(error.root_cause().to_string()),
    }
}

/// What a call's Store holds: only what one call needs.
pub struct CallState {
    /// WASI, with only what the handler's grants give; stdout and stderr go to the log.
    wasi: WasiCtx,
    /// WASI's resources (streams, pollables).
    table: ResourceTable,
    /// The linear-memory cap, and whether the handler hit it.
    limiter: MemoryLimiter,
    /// The handler's identity and configuration.
    context: Arc<HandlerContext>,
    /// When the call must be over: the epoch callback traps running wasm past it.
    deadline: Instant,
    /// The `log` import's lines, capped per call.
    log: HandlerLog,
    /// The handler's stdout, retagged for each call of a reused instance.
    stdout: LogStream,
    /// The handler's stderr, likewise.
    stderr: LogStream,
}

impl CallState {
    /// Readies a reused instance's state for another call.
    fn start_call(&mut self, request: &Request, deadline: Duration) {
        let method = Arc::from(request.method.as_str());
        let request_id = Arc::from(request.request_id.as_str());
        self.log.start_call(&method, &request_id);
        self.stdout.start_call(&method, &request_id);
        self.stderr.start_call(&method, &request_id);
        self.limiter.exhausted = false;
        self.deadline = Instant::now() + deadline;
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl host_api::Host for CallState {
    fn log(&mut self, level: Level, message: String) {
        let level = match level {
            Level::Trace => tracing::Level::TRACE,
            Level::Debug => tracing::Level::DEBUG,
            Level::Info => tracing::Level::INFO,
            Level::Warn => tracing::Level::WARN,
            Level::Error => tracing::Level::ERROR,
        };
        self.log.line(level, &message);
    }

    fn device_id(&mut self) -> String {
        self.context.device_id.clone()
    }

    fn config_get(&mut self, key: String) -> Option<String> {
        self.context.config.get(&key).cloned()
    }
}

/// Caps one instance's linear memory, and remembers whether the cap was hit so that
/// the resulting trap can be reported as memory exhaustion.
struct MemoryLimiter {
    /// The cap in bytes.
    max: usize,
    /// Whether a growth was refused.
    exhausted: bool,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.max;
        self.exhausted |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_advances_only_while_wasm_may_run() {
        let ticker = Ticker::start();
        let engine = Engine::default();
        ticker.add(&engine);
        let ticks = || ticker.ticks.load(Ordering::Relaxed);
        std::thread::sleep(EPOCH_TICK * 10);
        assert_eq!(ticks(), 0, "no tick while nothing runs");
        {
            let _running = ticker.running();
            let waited = Instant::now();
            while ticks() < 2 {
                assert!(
                    waited.elapsed() < Duration::from_secs(10),
                    "the epoch advances while wasm may run"
                );
                std::thread::sleep(EPOCH_TICK);
            }
        }
        let settled = ticks();
        std::thread::sleep(EPOCH_TICK * 10);
        assert_eq!(ticks(), settled, "parked again once nothing runs");
        {
            let _running = ticker.running();
            let waited = Instant::now();
            while ticks() == settled {
                assert!(
                    waited.elapsed() < Duration::from_secs(10),
                    "woken again by the next run"
                );
                std::thread::sleep(EPOCH_TICK);
            }
        }
    }

    /// An error whose cause is an OS error, as the memfd crate's are.
    #[derive(Debug)]
    struct Sealing(std::io::Error);

    impl std::fmt::Display for Sealing {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("cannot add seals to the memfd")
        }
    }

    impl std::error::Error for Sealing {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_busy_os_error_is_found_under_the_errors_that_wrap_it() {
        let busy = std::io::Error::from_raw_os_error(16);
        let error = wasmtime::Error::new(Sealing(busy)).context("making an image");
        assert!(is_busy(&error), "{error:?}");

        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let error = wasmtime::Error::new(Sealing(denied)).context("making an image");
        assert!(!is_busy(&error), "{error:?}");
        assert!(!is_busy(&wasmtime::format_err!("a trap")));
    }

    #[test]
    fn the_fallback_engine_for_kernels_without_pagemap_scan_builds() {
        let config = SandboxConfig {
            max_instances: 2,
            max_memory: 1 << 20,
            cache_dir: None,
            keep_resident: false,
            baseline: false,
        };
        engine(&config, false).expect("a plain pooling engine");
    }

    #[test]
    fn the_baseline_engine_builds() {
        baseline_engine().expect("a Winch engine");
    }
}
