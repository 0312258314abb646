//! The sandbox: one wasmtime engine for the host, handler components compiled and
//! pre-instantiated once per version, and a fresh, limited Store for every call.
//!
//! A call gets a fresh instance from the version's [`DeviceHandlerPre`], a deadline
//! enforced by epoch interruption, a linear-memory cap enforced by a resource limiter,
//! and WASI with nothing granted: no files, network, environment, arguments or stdin.
//! What the handler prints is captured and logged, tagged with the method and request.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::error::Context as _;
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::cache::CompileCache;
use crate::config::Grants;
use crate::dispatch::CallError;
use crate::output::LogStream;

/// The bindings of the handler world, generated once; only what the host uses leaves.
mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "device-handler",
    });
}

use bindings::edge::methods::host::{self as host_api, Level};
pub use bindings::exports::edge::methods::handler::{MethodInfo, Request, Response};
use bindings::{DeviceHandler, DeviceHandlerPre};

/// Bytes of linear memory (and of tables) a pool slot keeps resident between
/// instances, reset page by page; see [`engine`].
const KEEP_RESIDENT: usize = 2 * 1024 * 1024;

/// How often the epoch advances: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// How long a handler may take to list its methods when it is loaded.
const LOAD_DEADLINE: Duration = Duration::from_secs(2);

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
}

/// The engine and linker every handler version is compiled and linked with.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<CallState>,
    cache: Option<CompileCache>,
    compilations: AtomicU64,
    /// The largest linear memory the pool can give one instance.
    max_memory: usize,
}

impl Sandbox {
    /// Builds the engine (pooling allocator, epoch interruption) and the linker (WASI
    /// p2 and the host interface), and starts the epoch ticker.
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

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).context("linking WASI")?;
        DeviceHandler::add_to_linker::<_, HasSelf<CallState>>(&mut linker, |state| state)
            .context("linking the host interface")?;

        start_epoch_ticker(&engine);
        let cache = config
            .cache_dir
            .clone()
            .map(|dir| CompileCache::new(dir, &engine));
        Ok(Self {
            engine,
            linker,
            cache,
            compilations: AtomicU64::new(0),
            max_memory: config.max_memory,
        })
    }

    /// How many components this sandbox has compiled (rather than taken from the
    /// compiled-code cache).
    pub fn compilations(&self) -> u64 {
        self.compilations.load(Ordering::Relaxed)
    }

    /// The component of `wasm` (whose digest is `digest`): from the cache when a sound
    /// entry is there, else compiled, and cached for next time.
    fn component(&self, wasm: &[u8], digest: &str) -> wasmtime::Result<Component> {
        if let Some(component) = self
            .cache
            .as_ref()
            .and_then(|cache| cache.get(&self.engine, digest))
        {
            tracing::debug!(%digest, "compiled code taken from the cache");
            return Ok(component);
        }
        let component = Component::new(&self.engine, wasm).context("not a valid component")?;
        self.compilations.fetch_add(1, Ordering::Relaxed);
        if let Some(cache) = &self.cache {
            cache.put(digest, &component);
        }
        Ok(component)
    }

    /// Compiles a handler component (or takes it from the cache by `digest`),
    /// pre-instantiates it against the linker, and asks it once which methods it serves.
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
        let component = self.component(wasm, digest)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .context("the component needs imports the host does not give")?;
        let pre = DeviceHandlerPre::new(pre)
            .context("the component does not implement the edge:methods handler world")?;
        let context = Arc::new(context);
        let mut store = self.store(&context, "(load)", "-", LOAD_DEADLINE)?;
        let methods = pre
            .instantiate(&mut store)
            .and_then(|handler| handler.edge_methods_handler().call_methods(&mut store))
            .map_err(|e| describe_failure(e, &store, LOAD_DEADLINE))
            .context("listing the handler's methods failed")?;
        check_methods(&methods)?;
        Ok(HandlerCode {
            engine: self.engine.clone(),
            pre,
            context,
            methods,
            warm: Mutex::new(Vec::new()),
            spent: Mutex::new(Vec::new()),
        })
    }

    fn store(
        &self,
        context: &Arc<HandlerContext>,
        method: &str,
        request_id: &str,
        deadline: Duration,
    ) -> Result<Store<CallState>, CallError> {
        new_store(&self.engine, context, method, request_id, deadline)
    }
}

/// A fresh Store for one call: WASI with only what the handler's grants give, its
/// output going to the log, its memory capped, its deadline set.
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
        .max_memory_size(config.max_memory);
    if keep_resident {
        pool.linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Yes);
    }
    let mut engine_config = wasmtime::Config::new();
    engine_config
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&engine_config).context("configuring wasmtime")
}

fn new_store(
    engine: &Engine,
    context: &Arc<HandlerContext>,
    method: &str,
    request_id: &str,
    deadline: Duration,
) -> Result<Store<CallState>, CallError> {
    let method: Arc<str> = Arc::from(method);
    let request_id: Arc<str> = Arc::from(request_id);
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
        method,
        request_id,
        stdout,
        stderr,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limiter);
    store.set_epoch_deadline(ticks(deadline));
    Ok(store)
}

/// Epoch ticks that cover `deadline`, rounding up, and at least one.
fn ticks(deadline: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    u64::try_from(deadline.as_nanos().div_ceil(tick))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on a thread of its own, until the
/// engine is dropped.
fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("epoch-ticker".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        });
    if let Err(e) = spawned {
        // Without the ticker no deadline fires: say so loudly, but the host can serve.
        tracing::error!(error = %e, "could not start the epoch ticker; call deadlines will not be enforced");
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

/// What a handler version knows about itself, shared by all its calls.
#[derive(Debug, Clone)]
pub struct HandlerContext {
    /// The handler's file name, such as `echo.wasm`, for logs.
    pub file: String,
    /// The device id the host serves.
    pub device_id: String,
    /// The handler's own configuration values (its sidecar's `[config]` table).
    pub config: BTreeMap<String, String>,
    /// The linear-memory cap of one instance, in bytes.
    pub max_memory: usize,
    /// What WASI gives the handler beyond nothing.
    pub grants: Grants,
    /// Whether warm instances are reused across calls (the handler declares it keeps
    /// no state between them), and how many calls one instance serves at most.
    pub reuse: Option<u32>,
}

/// One compiled, pre-instantiated handler version.
pub struct HandlerCode {
    engine: Engine,
    pre: DeviceHandlerPre<CallState>,
    context: Arc<HandlerContext>,
    methods: Vec<MethodInfo>,
    /// Idle warm instances, for handlers that opted in to reuse. They belong to this
    /// version: a reload retires them with it.
    warm: Mutex<Vec<Warm>>,
    /// Stores of finished fresh calls, torn down by [`HandlerCode::recycle`] once
    /// their answers are on their way rather than before.
    spent: Mutex<Vec<Store<CallState>>>,
}

/// An instance kept warm between calls, with the Store it lives in.
struct Warm {
    store: Store<CallState>,
    handler: DeviceHandler,
    /// Calls it has served.
    calls: u32,
}

/// Idle warm instances kept per handler version; more are dropped when calls end.
const WARM_MAX: usize = 8;

/// Finished fresh instances whose teardown may wait until their answers are queued;
/// past this many (a burst), calls tear down their own, so pool slots stay free.
const SPENT_MAX: usize = 4;

impl HandlerCode {
    /// The methods this version serves, as it listed them when loaded.
    pub fn methods(&self) -> &[MethodInfo] {
        &self.methods
    }

    /// Runs one call: in a fresh instance, or in a warm one when the handler opted in
    /// to reuse. Blocks the thread for as long as the handler runs (at most
    /// `deadline`): call it from a blocking thread, never the poll loop.
    ///
    /// # Errors
    /// When the handler does not finish within `deadline`, exhausts its memory, or
    /// traps; none of these affect any other call, and the instance it happened in is
    /// never used again.
    pub fn call(&self, request: &Request, deadline: Duration) -> Result<Response, CallError> {
        let Some(max_calls) = self.context.reuse else {
            let (mut store, handler) = self.instantiate(request, deadline)?;
            let result = handler
                .edge_methods_handler()
                .call_handle(&mut store, request)
                .map_err(|e| describe_failure(e, &store, deadline));
            let mut spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
            if spent.len() < SPENT_MAX {
                spent.push(store);
            } else {
                // Many answers are queued at once: tear down here rather than hold more
                // pool slots.
                drop(spent);
                drop(store);
            }
            return result;
        };
        let warm = self
            .warm
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut warm = match warm {
            Some(mut warm) => {
                warm.store.data_mut().start_call(request);
                warm.store.set_epoch_deadline(ticks(deadline));
                warm
            }
            None => {
                let (store, handler) = self.instantiate(request, deadline)?;
                Warm {
                    store,
                    handler,
                    calls: 0,
                }
            }
        };
        let result = warm
            .handler
            .edge_methods_handler()
            .call_handle(&mut warm.store, request);
        match result {
            Ok(response) => {
                warm.calls += 1;
                if warm.calls < max_calls {
                    let mut idle = self.warm.lock().unwrap_or_else(PoisonError::into_inner);
                    if idle.len() < WARM_MAX {
                        idle.push(warm);
                    }
                }
                Ok(response)
            }
            // A trap, a deadline or exhausted memory: the instance is dropped here.
            Err(error) => Err(describe_failure(error, &warm.store, deadline)),
        }
    }

    /// Tears down the instances of finished fresh calls: work that need not delay an
    /// answer, so the host does it once the answer is on its way.
    pub fn recycle(&self) {
        let spent = std::mem::take(&mut *self.spent.lock().unwrap_or_else(PoisonError::into_inner));
        drop(spent);
    }

    /// A fresh Store and instance for `request`.
    fn instantiate(
        &self,
        request: &Request,
        deadline: Duration,
    ) -> Result<(Store<CallState>, DeviceHandler), CallError> {
        let mut store = new_store(
            &self.engine,
            &self.context,
            &request.method,
            &request.request_id,
            deadline,
        )?;
        match self.pre.instantiate(&mut store) {
            Ok(handler) => Ok((store, handler)),
            Err(error) => Err(describe_failure(error, &store, deadline)),
        }
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
    /// The method being served, for log lines.
    method: Arc<str>,
    /// The request being served, for log lines.
    request_id: Arc<str>,
    /// The handler's stdout, retagged for each call of a reused instance.
    stdout: LogStream,
    /// The handler's stderr, likewise.
    stderr: LogStream,
}

impl CallState {
    /// Readies a reused instance's state for another call.
    fn start_call(&mut self, request: &Request) {
        self.method = Arc::from(request.method.as_str());
        self.request_id = Arc::from(request.request_id.as_str());
        self.stdout.start_call(&self.method, &self.request_id);
        self.stderr.start_call(&self.method, &self.request_id);
        self.limiter.exhausted = false;
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
        let (file, method, rid) = (&self.context.file, &self.method, &self.request_id);
        macro_rules! log_at {
            ($level:ident) => {
                tracing::$level!(target: "edge_host::handler", handler = %file, method = %method, rid = %rid, "{message}")
            };
        }
        match level {
            Level::Trace => log_at!(trace),
            Level::Debug => log_at!(debug),
            Level::Info => log_at!(info),
            Level::Warn => log_at!(warn),
            Level::Error => log_at!(error),
        }
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
    fn the_fallback_engine_for_kernels_without_pagemap_scan_builds() {
        let config = SandboxConfig {
            max_instances: 2,
            max_memory: 1 << 20,
            cache_dir: None,
            keep_resident: false,
        };
        engine(&config, false).expect("a plain pooling engine");
    }

    #[test]
    fn deadlines_round_up_to_whole_ticks() {
        assert_eq!(ticks(Duration::ZERO), 1);
        assert_eq!(ticks(EPOCH_TICK), 1);
        assert_eq!(ticks(EPOCH_TICK + Duration::from_nanos(1)), 2);
        assert_eq!(ticks(Duration::from_secs(1)), 200);
    }
}
