%% hibernate: memory of hibernated processes and the cost of a hibernate +
%% wake cycle. The Erlang twin of hibernate.lua; see BENCHMARKS.md.
%%
%% Args (key=value): n, batch, sample, rounds (as hibernate.lua).
%% Each process holds #{k => I, name => <<"x">>, n => 2} and calls
%% erlang:hibernate/3 between messages.
-module(hibernate).
-export([main/0, main/1, loop/1, start/2]).

main() -> main([]).

main(Args) ->
    N = arg(Args, "n", 100000),
    B = arg(Args, "batch", 1000),
    S = arg(Args, "sample", 1000),
    R = arg(Args, "rounds", 20000),
    Step = max(1, N div S),
    garbage_collect(),
    Rss0 = rss_kb(),
    T0 = erlang:monotonic_time(millisecond),
    {Count, Sample} = spawn_batches(N, B, Step, self(), {0, []}),
    [wait_hibernated(P) || P <- Sample],
    T1 = erlang:monotonic_time(millisecond),
    garbage_collect(),
    Rss1 = rss_kb(),
    Alloc = lists:sum([element(2, process_info(P, memory)) || P <- Sample]) / length(Sample),
    Hib = length([P || P <- Sample,
                       process_info(P, current_function) =:= {current_function, {erlang, hibernate, 3}}]),
    Me = self(),
    [P ! {ping, Me} || P <- Sample],
    Answered = collect(length(Sample), 0),
    HibEcho = spawn(fun() -> erlang:hibernate(?MODULE, loop, [#{k => 0, name => <<"x">>, n => 2}]) end),
    AwakeEcho = spawn(fun() -> awake(#{k => 0, name => <<"x">>, n => 2}) end),
    HibRtt = rtt(HibEcho, R),
    AwakeRtt = rtt(AwakeEcho, R),
    io:format("detail n=~b hibernated in ~b ms; VmRSS ~b -> ~b KB; sample=~b hibernated=~b "
              "answered=~b; rtt hibernating ~.2f us, awake ~.2f us~n",
              [Count, T1 - T0, Rss0, Rss1, length(Sample), Hib, Answered, HibRtt, AwakeRtt]),
    io:format("RESULT name=hib_rss value=~.1f unit=B~n", [(Rss1 - Rss0) * 1024 / Count]),
    io:format("RESULT name=hib_alloc value=~.1f unit=B~n", [Alloc]),
    io:format("RESULT name=hib_total value=~.1f unit=MB~n", [Rss1 / 1024]),
    io:format("RESULT name=hib_woken value=~b unit=procs~n", [Answered]),
    io:format("RESULT name=hib_rtt value=~.3f unit=us~n", [HibRtt]),
    io:format("RESULT name=hib_cycle value=~.3f unit=us~n", [HibRtt - AwakeRtt]),
    erlang:halt(0).

start(Parent, I) ->
    Parent ! {started, I},
    erlang:hibernate(?MODULE, loop, [#{k => I, name => <<"x">>, n => 2}]).

loop(State) ->
    receive
        {ping, From} -> From ! maps:get(k, State)
    end,
    erlang:hibernate(?MODULE, loop, [State]).

awake(State) ->
    receive
        {ping, From} -> From ! maps:get(k, State)
    end,
    awake(State).

wait_hibernated(P) ->
    case process_info(P, current_function) of
        {current_function, {erlang, hibernate, 3}} -> ok;
        _ -> timer:sleep(1), wait_hibernated(P)
    end.

spawn_batches(0, _, _, _, Acc) -> Acc;
spawn_batches(N, B, Step, Parent, Acc) ->
    K = min(N, B),
    Acc1 = spawn_n(K, Step, Parent, Acc),
    wait(K),
    spawn_batches(N - K, B, Step, Parent, Acc1).

spawn_n(0, _, _, Acc) -> Acc;
spawn_n(K, Step, Parent, {Count, Sample}) ->
    I = Count + 1,
    P = spawn(?MODULE, start, [Parent, I]),
    Sample1 = case I rem Step of 0 -> [P | Sample]; _ -> Sample end,
    spawn_n(K - 1, Step, Parent, {I, Sample1}).

wait(0) -> ok;
wait(I) -> receive {started, _} -> wait(I - 1) end.

collect(0, Acc) -> Acc;
collect(K, Acc) ->
    receive X when is_integer(X) -> collect(K - 1, Acc + 1)
    after 10000 -> Acc
    end.

rtt(P, R) ->
    Me = self(),
    [begin P ! {ping, Me}, receive _ -> ok end end || _ <- lists:seq(1, min(1000, R))],
    T0 = erlang:monotonic_time(nanosecond),
    rtt_loop(P, Me, R),
    (erlang:monotonic_time(nanosecond) - T0) / 1000 / R.

rtt_loop(_, _, 0) -> ok;
rtt_loop(P, Me, K) -> P ! {ping, Me}, receive _ -> ok end, rtt_loop(P, Me, K - 1).

rss_kb() ->
    {ok, Bin} = file:read_file("/proc/self/status"),
    [Line] = [L || L <- string:split(binary_to_list(Bin), "\n", all),
                   lists:prefix("VmRSS:", L)],
    [_, Kb | _] = string:lexemes(Line, " \t"),
    list_to_integer(Kb).

arg([], _, Default) -> Default;
arg([A | Rest], Key, Default) ->
    case string:split(A, "=") of
        [Key, V] -> list_to_integer(V);
        _ -> arg(Rest, Key, Default)
    end.
