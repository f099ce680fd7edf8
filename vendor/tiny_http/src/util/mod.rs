pub use self::messages_queue::MessagesQueue;
pub(crate) use self::task_pool::{Serve, TaskPool};

mod messages_queue;
mod task_pool;
