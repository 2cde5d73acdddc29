// A JVM thread pool whose idle workers time out after 200 ms: a test target for threads
// that end after a checkpoint. Commands on stdin: "work N" runs N tasks at once and prints
// "worked N <distinct worker threads>"; "quit" exits 0.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.util.Set;
import java.util.concurrent.*;

public class Pool {
    public static void main(String[] args) throws Exception {
        ThreadPoolExecutor pool = new ThreadPoolExecutor(
            4, 4, 200, TimeUnit.MILLISECONDS, new LinkedBlockingQueue<>());
        pool.allowCoreThreadTimeOut(true);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        System.out.println("ready");
        String line;
        while ((line = in.readLine()) != null) {
            if (line.startsWith("work ")) {
                int n = Integer.parseInt(line.substring(5));
                Set<String> names = ConcurrentHashMap.newKeySet();
                CountDownLatch started = new CountDownLatch(n);
                CountDownLatch go = new CountDownLatch(1);
                Future<?>[] fs = new Future<?>[n];
                for (int i = 0; i < n; i++) {
                    fs[i] = pool.submit(() -> {
                        names.add(Thread.currentThread().getName());
                        started.countDown();
                        try { go.await(); } catch (InterruptedException e) { }
                    });
                }
                started.await(5, TimeUnit.SECONDS);
                go.countDown();
                for (Future<?> f : fs) f.get(5, TimeUnit.SECONDS);
                System.out.println("worked " + n + " " + names.size() + " " + pool.getPoolSize());
            } else if (line.equals("quit")) {
                pool.shutdown();
                pool.awaitTermination(5, TimeUnit.SECONDS);
                System.out.println("bye");
                System.exit(0);
            }
        }
    }
}
